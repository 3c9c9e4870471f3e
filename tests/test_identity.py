"""The key map (partition-id -> SuperNode public key file) and key normalisation.

The keys are made here with ``cryptography``; the forms checked are the ones Flower
uses: ``flwr supernode register`` reads an OpenSSH public key file and stores it as
PEM SubjectPublicKeyInfo (what ``NodeInfo.public_key`` then holds).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fl_clip21.flower.identity import load_node_keys, normalise_public_key

Enc, Fmt = serialization.Encoding, serialization.PublicFormat


def openssh(key: ec.EllipticCurvePrivateKey, comment: bytes = b"") -> bytes:
    line = key.public_key().public_bytes(Enc.OpenSSH, Fmt.OpenSSH)
    return line + (b" " + comment if comment else b"") + b"\n"


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Enc.PEM, Fmt.SubjectPublicKeyInfo)


def der(key) -> bytes:
    return key.public_key().public_bytes(Enc.DER, Fmt.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]


# --- normalise_public_key ---------------------------------------------------------


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_every_encoding_of_a_key_normalises_to_its_der(curve):
    key = ec.generate_private_key(curve)
    pub = key.public_key()
    forms = [
        public_key_to_bytes(pub),  # NodeInfo.public_key: PEM SubjectPublicKeyInfo
        openssh(key),
        openssh(key, b"node-0@lab"),
        b"  " + pem(key) + b"\n\n",
        der(key),
    ]
    assert {normalise_public_key(f) for f in forms} == {der(key)}


def test_what_flower_registers_from_a_key_file_matches_the_file(tmp_path, keys):
    """``flwr supernode register KEY.pub`` sends the SuperLink exactly these bytes (PEM SPKI)."""
    path = tmp_path / "sn.pub"
    path.write_bytes(openssh(keys[0], b"comment"))
    registered = try_load_public_key(path)
    assert registered.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert normalise_public_key(registered) == normalise_public_key(path.read_bytes())


def test_different_keys_stay_different(keys):
    assert len({normalise_public_key(openssh(k)) for k in keys}) == len(keys)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not an OpenSSH, PEM or DER public key"),
        (b"hello world", "not an OpenSSH, PEM or DER public key: b'hello world'"),
        (b"ecdsa-sha2-nistp384 AAAAnotbase64", "not an OpenSSH, PEM or DER public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not an OpenSSH, PEM or DER"),
    ],
)
def test_garbage_is_refused(raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        normalise_public_key(raw)


def test_keys_flower_would_refuse_are_refused():
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Enc.OpenSSH, Fmt.OpenSSH)
    with pytest.raises(ValueError, match="key type Ed25519PublicKey: Flower's SuperNode authentication takes only EC"):
        normalise_public_key(ed)
    rsa_ssh = rsa.generate_private_key(65537, 2048).public_key().public_bytes(Enc.OpenSSH, Fmt.OpenSSH)
    with pytest.raises(ValueError, match="key type RSAPublicKey: "):
        normalise_public_key(rsa_ssh)
    with pytest.raises(ValueError, match="EC curve secp256k1: Flower's SuperNode authentication takes only NIST"):
        normalise_public_key(pem(ec.generate_private_key(ec.SECP256K1())))


@pytest.mark.parametrize("fmt", ["openssh", "pkcs8"])
def test_a_private_key_is_refused_without_showing_it(keys, fmt):
    form = serialization.PrivateFormat.OpenSSH if fmt == "openssh" else serialization.PrivateFormat.PKCS8
    private = keys[0].private_bytes(Enc.PEM, form, serialization.NoEncryption())
    with pytest.raises(ValueError, match=r"private key, not a public key \(give the .pub file\)") as err:
        normalise_public_key(private)
    body = private.decode().splitlines()[1]
    assert body[:20] not in str(err.value)


# --- load_node_keys ---------------------------------------------------------------


def write_keys(folder: Path, keys) -> list[Path]:
    """``folder/sn{i}.pub`` for each key, OpenSSH except the second (PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sn{i}.pub" for i in range(len(keys))]
    for i, (key, path) in enumerate(zip(keys, paths)):
        path.write_bytes(pem(key) if i == 1 else openssh(key, b"sn%d" % i))
    return paths


def test_load_node_keys_maps_normalised_keys_to_partitions(tmp_path, keys):
    paths = write_keys(tmp_path / "keys", keys)
    mapping = tmp_path / "node-keys.csv"
    mapping.write_text(
        "# partition-id,public-key-file\n"
        "\n"
        "2, keys/sn0.pub\n"  # relative to the map's folder; spaces around the fields
        f"0,{paths[1]}\n"  # absolute
        "   # an indented comment\n"
        "1,keys/sn2.pub   \n"
    )
    got = load_node_keys(mapping)
    assert got == {der(keys[0]): 2, der(keys[1]): 0, der(keys[2]): 1}
    # What the ServerApp sees for a node that authenticated with key 1: NodeInfo.public_key (PEM).
    assert got[normalise_public_key(public_key_to_bytes(keys[1].public_key()))] == 0
    assert load_node_keys(str(mapping)) == got


def test_relative_key_files_do_not_depend_on_the_working_directory(tmp_path, keys, monkeypatch):
    write_keys(tmp_path / "conf" / "keys", keys[:1])
    (tmp_path / "conf" / "map.csv").write_text("0,keys/sn0.pub\n")
    monkeypatch.chdir(tmp_path)
    assert load_node_keys(Path("conf/map.csv")) == {der(keys[0]): 0}


def test_a_key_file_with_a_comma_in_its_name(tmp_path, keys):
    (tmp_path / "a,b.pub").write_bytes(openssh(keys[0]))
    (tmp_path / "map.csv").write_text("0,a,b.pub\n")
    assert load_node_keys(tmp_path / "map.csv") == {der(keys[0]): 0}


def test_a_missing_map_names_it(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"node key map {str(tmp_path / 'nope.csv')!r} cannot be read")):
        load_node_keys(tmp_path / "nope.csv")


def test_an_empty_map_is_refused(tmp_path):
    (tmp_path / "map.csv").write_text("# partition-id,public-key-file\n\n")
    with pytest.raises(ValueError, match="has no 'partition-id,public-key-file' line"):
        load_node_keys(tmp_path / "map.csv")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 keys/sn0.pub", "expected 'partition-id,public-key-file', got '0 keys/sn0.pub'"),
        ("0,", "expected 'partition-id,public-key-file', got '0,'"),
        (",keys/sn0.pub", "expected 'partition-id,public-key-file', got ',keys/sn0.pub'"),
        ("-1,keys/sn0.pub", "partition-id must be a non-negative integer, got '-1'"),
        ("one,keys/sn0.pub", "partition-id must be a non-negative integer, got 'one'"),
        ("1.0,keys/sn0.pub", "partition-id must be a non-negative integer, got '1.0'"),
        ("\u00b2,keys/sn0.pub", "partition-id must be a non-negative integer, got '\u00b2'"),
    ],
)
def test_a_bad_line_names_file_line_and_value(tmp_path, keys, line, message):
    write_keys(tmp_path / "keys", keys[:1])
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"# header\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"{mapping}:2: {message}")):
        load_node_keys(mapping)


def test_a_partition_twice_is_refused(tmp_path, keys):
    write_keys(tmp_path / "keys", keys[:2])
    mapping = tmp_path / "map.csv"
    mapping.write_text("0,keys/sn0.pub\n\n0,keys/sn1.pub\n")
    with pytest.raises(ValueError, match=re.escape(f"{mapping}:3: partition-id 0 already has a key (line 1)")):
        load_node_keys(mapping)


def test_a_key_twice_is_refused_whatever_its_encoding(tmp_path, keys):
    write_keys(tmp_path / "keys", keys[:1])
    (tmp_path / "keys" / "same.pem").write_bytes(pem(keys[0]))
    mapping = tmp_path / "map.csv"
    mapping.write_text("0,keys/sn0.pub\n1,keys/same.pem\n")
    expected = (
        f"{mapping}:2: key file {str(tmp_path / 'keys' / 'same.pem')!r} holds the same public key as line 1 "
        "(partition-id 0): one key per node"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_node_keys(mapping)


def test_a_missing_key_file_names_it(tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("0,keys/absent.pub\n")
    expected = f"{mapping}:1: key file {str(tmp_path / 'keys' / 'absent.pub')!r} cannot be read"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_node_keys(mapping)


def test_a_key_file_without_a_usable_key_names_it(tmp_path, keys):
    (tmp_path / "sn0").write_bytes(
        keys[0].private_bytes(Enc.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    (tmp_path / "ed.pub").write_bytes(ed.public_bytes(Enc.OpenSSH, Fmt.OpenSSH))
    (tmp_path / "junk.pub").write_text("not a key\n")
    mapping = tmp_path / "map.csv"
    for name, message in [
        ("sn0", "this is a private key, not a public key (give the .pub file)"),
        ("ed.pub", "key type Ed25519PublicKey: Flower's SuperNode authentication takes only EC keys"),
        ("junk.pub", "not an OpenSSH, PEM or DER public key: b'not a key'"),
    ]:
        mapping.write_text(f"0,{name}\n")
        with pytest.raises(ValueError, match=re.escape(f"{mapping}:1: key file {str(tmp_path / name)!r}: {message}")):
            load_node_keys(mapping)
