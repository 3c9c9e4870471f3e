"""Outputs are additive: a run never deletes or overwrites what it did not write.

The rules of :mod:`fl_clip21.outputs` (new folders, the manifest, ``overwrite``,
an interrupted run's checkpoint, the lock, staging, a property test over random
trees of user files).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_clip21.outputs import (
    CHECKPOINT, LOCK, MANIFEST, STAGING, OutputError, Wording, claim, new_folder, read_manifest, stage_file,
)



def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None: a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _user_files(root: Path) -> dict[str, bytes | None]:
    """A file and a folder of a user's own under ``root``; the tree they make."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "x.csv").write_text("1,2\n")
    (root / "notes.txt").write_text("my notes\n")
    return _tree(root)


def _write(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def _run(out: Path | None, files: dict[str, str], **kwargs) -> list[str]:
    """Claim ``out``, write ``files`` into the staging folder, commit; the names committed."""
    with claim(out, name=kwargs.pop("name", "scenario"), planned=list(files), **kwargs) as output:
        output.write(lambda staging: _write(staging, files))
        return output.commit()


# --- the module ---------------------------------------------------------------


def test_new_folders_are_numbered_and_never_an_existing_one(tmp_path):
    root = tmp_path / "results"
    assert new_folder(root, "run") == root / "run"
    assert new_folder(root, "run") == root / "run-2"
    (root / "run-3").mkdir()  # empty, and still not reused
    assert new_folder(root, "run") == root / "run-4"
    assert sorted(p.name for p in root.iterdir()) == ["run", "run-2", "run-3", "run-4"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "../up"])
def test_a_name_that_is_not_a_plain_folder_name_creates_nothing(tmp_path, name):
    with pytest.raises(OutputError, match=r"name .* must be a plain folder name"):
        new_folder(tmp_path / "results", name)
    assert list(tmp_path.iterdir()) == []


def test_a_run_writes_its_files_and_a_manifest_and_leaves_no_lock_or_staging(tmp_path):
    out = tmp_path / "out"
    written = _run(out, {"metrics.json": "{}", "run/seed-0/config.json": "{}"})
    assert written == ["metrics.json", "run/"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "metrics.json", "run"]
    manifest = read_manifest(out)
    assert manifest.files == {"metrics.json", "run/seed-0/config.json"}
    assert manifest.folders == {"run", "run/seed-0"} and manifest.trees == frozenset()


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    _run(out, {"metrics.json": "old"})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        _run(out, {"metrics.json": "new"})
    assert str(e.value).startswith(f"--out {str(out)!r} is not empty (2 entries): ")
    assert "--overwrite" in str(e.value) and (out / "metrics.json").read_text() == "old"
    _run(out, {"summary.md": "new"}, overwrite=True)
    # The earlier run's metrics.json is fl-clip21's and not of this run: gone; the user's file stays.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "notes.txt", "summary.md"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_before_the_run_when_a_user_file_has_an_output_name(tmp_path):
    out = tmp_path / "out"
    _user_files(out)
    (out / "run").mkdir()
    (out / "run" / "seed-0").write_text("a file where a run folder goes")
    before = _tree(out)
    for planned, named in (("notes.txt", "notes.txt"), ("run/seed-0/metrics.json", "run")):
        with pytest.raises(OutputError, match=f"holds '{named}', which fl-clip21 did not write"):
            claim(out, name="x", planned=[planned], overwrite=True)
        assert _tree(out) == before


def test_an_interrupted_run_keeps_its_checkpoint_and_is_resumed_or_discarded(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with claim(out, name="x", planned=["metrics.json"], checkpoint=True) as output:
            (output.folder / CHECKPOINT).mkdir()
            (output.folder / CHECKPOINT / "gd.npz").write_text("state")
            output.write(lambda staging: _write(staging, {"metrics.json": "half"}))
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, CHECKPOINT]  # nothing half-written
    with pytest.raises(OutputError) as e:
        claim(out, name="x", planned=["metrics.json"])
    assert str(e.value) == (
        f"--out {str(out)!r} holds an interrupted run: continue it with --resume {out}, or --overwrite to discard it"
    )
    with claim(out, name="x", planned=["metrics.json"], resume=True, checkpoint=True) as output:
        assert (output.folder / CHECKPOINT / "gd.npz").read_text() == "state"
        output.write(lambda staging: _write(staging, {"metrics.json": "done"}))
        output.commit()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "metrics.json"]  # the finished run removed it
    with pytest.raises(OutputError, match="holds no interrupted run"):
        claim(out, name="x", planned=[], resume=True, checkpoint=True)


def test_overwrite_discards_an_interrupted_runs_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with claim(out, name="x", planned=[], checkpoint=True) as output:
            (output.folder / CHECKPOINT).mkdir()
            raise RuntimeError
    with claim(out, name="x", planned=["metrics.json"], overwrite=True) as output:
        assert not (out / CHECKPOINT).exists()
        output.commit()


def test_a_failed_run_in_a_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with claim(tmp_path / "a" / "b", name="x", planned=["metrics.json"]) as output:
            output.write(lambda staging: _write(staging, {"metrics.json": "half"}))
            raise ValueError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "proc", "under-a-file"])
def test_an_unwritable_folder_is_refused_at_claim(tmp_path, where):
    (tmp_path / "f").write_text("mine")
    out = {"file": tmp_path / "f", "proc": Path("/proc/fl-clip21"), "under-a-file": tmp_path / "f" / "out"}[where]
    with pytest.raises(OutputError, match=rf"^--out {str(out)!r} "):
        claim(out, name="x", planned=["metrics.json"])
    assert _tree(tmp_path) == {"f": b"mine"}


def test_a_held_folder_is_refused_naming_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    script = f"import sys; from fl_clip21.outputs import claim; o = claim({str(out)!r}, name='x', planned=[]); " \
        "print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert (out / LOCK).read_text().strip() == str(holder.pid)
        with pytest.raises(OutputError) as e:
            claim(out, name="x", planned=[], overwrite=True)
    finally:
        holder.communicate("", timeout=60)
    assert str(e.value) == (
        f"--out {str(out)!r} is in use by another fl-clip21 run (pid {holder.pid}): "
        "wait until it ends, or choose another folder"
    )
    _run(out, {"metrics.json": "{}"}, overwrite=True)  # free once the holder is gone


def test_a_manifest_that_names_paths_outside_the_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious").write_text("keep")
    (out / MANIFEST).write_text(json.dumps({"fl-clip21-manifest": 1, "files": ["../precious"], "folders": [], "trees": []}))
    with pytest.raises(OutputError, match=r"not a manifest fl-clip21 wrote .*'\.\./precious'"):
        claim(out, name="x", planned=["metrics.json"], overwrite=True)
    assert (tmp_path / "precious").read_text() == "keep"


def test_a_user_file_named_like_the_lock_or_staging_folder_is_left_alone(tmp_path):
    for name in (LOCK, STAGING):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (out / name).write_text("mine, not a pid")
        with pytest.raises(OutputError, match=f"holds {name!r}"):
            claim(out, name="x", planned=["metrics.json"], overwrite=True)
        assert (out / name).read_text() == "mine, not a pid"


def test_a_staged_file_never_replaces_an_existing_one_unless_overwrite(tmp_path):
    out = tmp_path / "bench.json"
    staged = stage_file(out)
    staged.tmp.write_text("first")
    staged.commit()
    assert out.read_text() == "first"
    with pytest.raises(OutputError, match=rf"^--out {str(out)!r} exists: .*--overwrite"):
        stage_file(out)
    staged = stage_file(out, overwrite=True)
    staged.tmp.write_text("second")
    staged.discard()
    assert out.read_text() == "first"
    staged = stage_file(out, overwrite=True)
    staged.tmp.write_text("second")
    staged.commit()
    assert out.read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
    for bad in (tmp_path, tmp_path / "missing" / "b.json", Path("/proc/fl-clip21.json")):
        with pytest.raises(OutputError, match=rf"^--out {str(bad)!r} "):
            stage_file(bad, overwrite=True)


NAMES = ["metrics.json", "summary.md", "run", "seed-0", CHECKPOINT, "notes.txt", "eps-1", MANIFEST]


@st.composite
def _user_tree(draw) -> dict[str, str]:
    """Random user files, some with the names of outputs, some where output folders go."""
    paths = draw(st.lists(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), max_size=6))
    files: dict[str, str] = {}
    for parts in paths:
        rel = "/".join(parts)
        clash = any(rel.startswith(f + "/") or f.startswith(rel + "/") or f == rel for f in files)
        if not clash and rel != MANIFEST:
            files[rel] = f"user {rel}"
    return files


OUTPUTS = [{"metrics.json": "1", "summary.md": "1"}, {"run/seed-0/metrics.json": "2", "summary.md": "2"}]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=_user_tree(), runs=st.lists(st.tuples(st.sampled_from([0, 1]), st.booleans()), min_size=1, max_size=3))
def test_user_files_survive_every_sequence_of_runs(user, runs):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        _write(out, user)
        for which, overwrite in runs:
            files = OUTPUTS[which]
            before = _tree(out)
            try:
                _run(out, files, overwrite=overwrite)
            except OutputError:
                assert _tree(out) == before  # refused: nothing changed
            else:
                assert all((out / rel).read_text() == text for rel, text in files.items())
                assert not (out / LOCK).exists() and not (out / STAGING).exists()
            for rel, text in user.items():
                assert (out / rel).read_text() == text, rel
