"""Which SuperNode public key belongs to which client: the user's key map.

With Flower's SuperNode authentication the SuperLink knows every node by an EC public
key on a NIST curve: the CLI registers it from an OpenSSH public key file
(``flwr supernode register KEY.pub``), the node proves it holds the private key on
every Fleet API request, and the ServerApp sees it in ``grid.get_nodes()`` as
``NodeInfo.public_key``, PEM SubjectPublicKeyInfo. :func:`normalise_public_key` turns
either form (and DER) into the same bytes, so the strategy can compare what a node
proved with what the user's key map says.

The key map is a text file, one client per line::

    # partition-id,public-key-file
    0,keys/supernode-0.pub
    1,/etc/fl-clip21/keys/supernode-1.pub

A relative key file is relative to the folder of the key map. Blank lines and lines
starting with ``#`` are skipped. A key file holds one public key: OpenSSH
(``ecdsa-sha2-nistp384 AAAA... comment``, what ``ssh-keygen -t ecdsa -b 384``
writes and ``flwr supernode register`` reads) or PEM / DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

# The curves Flower accepts for SuperNode keys (flwr.supercore.primitives.asymmetric.uses_nist_ec_curve).
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _load_public_key(raw: bytes) -> PublicKeyTypes:
    """The key object of an OpenSSH, PEM or DER public key (raises ValueError or UnsupportedAlgorithm)."""
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(text)
    if text.startswith((b"ecdsa-", b"ssh-")):
        return serialization.load_ssh_public_key(text)
    return serialization.load_der_public_key(raw)


def _shown(raw: bytes) -> str:
    """The start of ``raw`` for an error message."""
    head = raw.strip()[:40]
    return repr(head + (b"..." if len(raw.strip()) > 40 else b""))


def normalise_public_key(raw: bytes) -> bytes:
    """The canonical bytes of a SuperNode public key: DER SubjectPublicKeyInfo.

    Parameters
    ----------
    raw : bytes
        A public key as ``NodeInfo.public_key`` holds it (PEM SubjectPublicKeyInfo)
        or as a key file holds it: OpenSSH (``ecdsa-sha2-nistp384 AAAA... comment``),
        PEM or DER SubjectPublicKeyInfo. Surrounding whitespace is ignored.

    Returns
    -------
    bytes
        The DER SubjectPublicKeyInfo of the key: equal for every encoding of one key.

    Raises
    ------
    ValueError
        When ``raw`` is not a public key, is a private key, or is not an EC key on a
        NIST curve (the only keys Flower's SuperNode authentication accepts).
    """
    if b"PRIVATE KEY" in raw:
        raise ValueError("this is a private key, not a public key (give the .pub file)")
    try:
        key = _load_public_key(raw)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"not an OpenSSH, PEM or DER public key: {_shown(raw)} ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"key type {type(key).__name__}: Flower's SuperNode authentication takes only EC keys on a "
            f"NIST curve (e.g. ssh-keygen -t ecdsa -b 384): {_shown(raw)}"
        )
    if not isinstance(key.curve, NIST_CURVES):
        raise ValueError(
            f"EC curve {key.curve.name}: Flower's SuperNode authentication takes only NIST curves "
            f"(secp256r1, secp384r1, secp521r1, ...): {_shown(raw)}"
        )
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_node_keys(path: str | Path) -> dict[bytes, int]:
    """Read a key map: ``partition-id,public-key-file`` per line (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The key map file. Relative key files are relative to its folder.

    Returns
    -------
    dict[bytes, int]
        Normalised public key (:func:`normalise_public_key`) -> partition-id.

    Raises
    ------
    ValueError
        Naming the file, the line and the value: the map cannot be read or has no
        entry; a line is not ``partition-id,public-key-file``; a partition-id is not
        a non-negative integer or comes twice; a key file cannot be read or holds no
        key Flower accepts; two lines name the same key.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"node key map {str(path)!r} cannot be read: {err}") from None
    keys: dict[bytes, int] = {}
    line_of_partition: dict[int, int] = {}
    line_of_key: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        partition_text, comma, key_text = (part.strip() for part in text.partition(","))
        if not comma or not partition_text or not key_text:
            raise ValueError(f"{where}: expected 'partition-id,public-key-file', got {text!r}")
        if not (partition_text.isascii() and partition_text.isdigit()):
            raise ValueError(f"{where}: partition-id must be a non-negative integer, got {partition_text!r}")
        partition = int(partition_text)
        if partition in line_of_partition:
            raise ValueError(
                f"{where}: partition-id {partition} already has a key (line {line_of_partition[partition]})"
            )
        key_file = Path(key_text).expanduser()
        if not key_file.is_absolute():
            key_file = path.parent / key_file
        try:
            raw = key_file.read_bytes()
        except OSError as err:
            raise ValueError(f"{where}: key file {str(key_file)!r} cannot be read: {err}") from None
        try:
            key = normalise_public_key(raw)
        except ValueError as err:
            raise ValueError(f"{where}: key file {str(key_file)!r}: {err}") from None
        if key in line_of_key:
            raise ValueError(
                f"{where}: key file {str(key_file)!r} holds the same public key as line {line_of_key[key]}"
                f" (partition-id {keys[key]}): one key per node"
            )
        keys[key] = partition
        line_of_partition[partition] = number
        line_of_key[key] = number
    if not keys:
        raise ValueError(f"node key map {str(path)!r} has no 'partition-id,public-key-file' line")
    return keys
