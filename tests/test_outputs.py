"""Outputs are additive: a run never deletes or overwrites what it did not write.

First the rules of :mod:`fl_clip21.outputs` on their own (new folders, the
manifest, ``overwrite``, an interrupted run's checkpoint, the lock, staging, a
property test over random trees of user files), then every case users saw lost,
through the real command line (``--engine vectorized`` on mean-estimation: a
second or two, or refused before anything runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_clip21.outputs import (
    CHECKPOINT, LOCK, MANIFEST, STAGING, OutputError, Wording, claim, new_folder, read_manifest, stage_file,
)

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "fl_clip21.cli"]
MEAN = REPO / "scenarios" / "mean-estimation.toml"
FAST = ["--engine", "vectorized", "--set", "rounds=5"]


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


def test_a_failed_run_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "a" / "b", tmp_path / "empty"):
        with pytest.raises(ValueError):
            with claim(out, name="x", planned=["metrics.json"]) as output:
                output.write(lambda staging: _write(staging, {"metrics.json": "half"}))
                raise ValueError
    assert _tree(tmp_path) == {"empty": None}


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


# --- the command line ---------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLWR_"))}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def _nothing_ran(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "round" not in proc.stderr  # refused before the first round


def _killed_run(folder: Path) -> None:
    """What a SIGKILLed Flower-engine run leaves: checkpoint, manifest, lock file, staging folder."""
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from fl_clip21.config import load_scenario, parse_sets
        from fl_clip21.outputs import CHECKPOINT, claim
        cfg = load_scenario({str(MEAN)!r}, parse_sets(["rounds=5"]))
        out = claim(Path({str(folder)!r}), name=cfg["name"], planned=["metrics.json"], checkpoint=True)
        (out.folder / CHECKPOINT).mkdir()
        (out.folder / CHECKPOINT / "config.json").write_text(json.dumps(cfg))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {LOCK, STAGING, MANIFEST, CHECKPOINT} <= {p.name for p in folder.iterdir()}


def test_cli_out_at_a_non_empty_folder_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "mine"
    before = _user_files(out)
    proc = _cli("run", str(MEAN), *FAST, "--out", str(out), cwd=tmp_path)
    _nothing_ran(proc)
    assert f"--out {str(out)!r} is not empty (2 entries)" in proc.stderr and "--overwrite" in proc.stderr
    assert _tree(out) == before


def test_cli_out_dot_is_refused_and_the_working_directory_survives(tmp_path):
    before = _user_files(tmp_path)
    proc = _cli("run", str(MEAN), *FAST, "--out", ".", cwd=tmp_path)
    _nothing_ran(proc)
    assert "--out '.' is not empty (2 entries)" in proc.stderr
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["..", "{abs}", ""])
def test_cli_a_hostile_scenario_name_deletes_nothing(tmp_path, name):
    # Before: the output went to results/NAME, replaced with rmtree: a parent, an absolute folder, all of results/.
    work, elsewhere = tmp_path / "work", tmp_path / "abs"
    _user_files(work)
    _write(work, {"results/earlier/metrics.json": "{}"})
    before_work, before_elsewhere = _tree(work), _user_files(elsewhere)
    proc = _cli("run", str(MEAN), *FAST, "--set", f"name={name.format(abs=elsewhere)}", cwd=work)
    _nothing_ran(proc)
    assert "name" in proc.stderr
    assert _tree(work) == before_work and _tree(elsewhere) == before_elsewhere


def test_cli_without_out_every_run_gets_a_new_folder(tmp_path):
    first = _cli("run", str(MEAN), *FAST, cwd=tmp_path)
    second = _cli("run", str(MEAN), *FAST, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["mean-estimation", "mean-estimation-2"]
    for name, proc in (("mean-estimation", first), ("mean-estimation-2", second)):
        folder = tmp_path / "results" / name
        assert json.loads((folder / "config.json").read_text())["rounds"] == 5
        listed = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        assert proc.stdout.rstrip().splitlines()[-1] == f"wrote results/{name}/: {', '.join(listed)}"
        assert sorted(json.loads((folder / MANIFEST).read_text())["files"]) == listed


@pytest.mark.parametrize("where", ["file", "proc"])
def test_cli_an_unwritable_out_fails_before_the_run(tmp_path, where):
    # Before: the vectorized engine ran every round, then the write failed and the results were lost.
    target = tmp_path / "taken" if where == "file" else Path("/proc/fl-clip21-out")
    if where == "file":
        target.write_text("a file of mine\n")
    proc = _cli("run", str(MEAN), "--engine", "vectorized", "--out", str(target), cwd=tmp_path)
    _nothing_ran(proc)
    assert f"fl-clip21: error: --out {str(target)!r} " in proc.stderr
    assert _tree(tmp_path) == ({"taken": b"a file of mine\n"} if where == "file" else {})


def test_cli_a_second_run_on_an_interrupted_folder_names_resume_and_keeps_the_checkpoint(tmp_path):
    # Before: a second run on the same --out threw the checkpoint away without a word.
    out = tmp_path / "out"
    _killed_run(out)
    before = _tree(out)
    proc = _cli("run", str(MEAN), *FAST, "--out", str(out), cwd=tmp_path)
    _nothing_ran(proc)
    assert (
        f"--out {str(out)!r} holds an interrupted run: continue it with --resume {out}, "
        "or --overwrite to discard it" in proc.stderr
    )
    assert _tree(out) == before


def test_cli_overwrite_replaces_only_what_fl_clip21_wrote(tmp_path):
    out = tmp_path / "out"
    _killed_run(out)
    (out / "notes.txt").write_text("mine\n")
    proc = _cli("run", str(MEAN), *FAST, "--out", str(out), "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not (out / CHECKPOINT).exists() and not (out / LOCK).exists() and not (out / STAGING).exists()
    assert json.loads((out / "metrics.json").read_text())["algorithms"]["gd"][-1]["round"] == 5
    manifest = json.loads((out / MANIFEST).read_text())
    assert "notes.txt" not in manifest["files"] and "summary.md" in manifest["files"]

    (out / "summary.md").write_text("my own summary now\n")  # and no longer fl-clip21's
    (out / MANIFEST).write_text(json.dumps({**manifest, "files": [f for f in manifest["files"] if f != "summary.md"]}))
    before = _tree(out)
    refused = _cli("run", str(MEAN), *FAST, "--out", str(out), "--overwrite", cwd=tmp_path)
    _nothing_ran(refused)
    assert f"--out {str(out)!r} holds 'summary.md', which fl-clip21 did not write" in refused.stderr
    assert _tree(out) == before


def test_cli_a_second_resume_of_a_folder_in_use_is_refused_naming_the_pid(tmp_path):
    # Before: two concurrent --resume on one folder both exited 0, both writing one checkpoint.
    out = tmp_path / "out"
    _killed_run(out)
    script = textwrap.dedent(
        f"""
        import sys
        from fl_clip21.outputs import claim
        out = claim({str(out)!r}, name="x", planned=[], resume=True, checkpoint=True)
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = _cli("run", "--resume", str(out), cwd=tmp_path)
    finally:
        holder.communicate("", timeout=60)
    _nothing_ran(proc)
    assert f"--resume {str(out)!r} is in use by another fl-clip21 run (pid {holder.pid})" in proc.stderr


def test_cli_resume_of_an_unreadable_checkpoint_names_it_before_the_simulation_and_keeps_it(tmp_path):
    out = tmp_path / "out"
    _killed_run(out)
    broken = out / CHECKPOINT / "run-0" / "clip-gd.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"not an npz")
    before = _tree(out / CHECKPOINT)
    proc = _cli("run", "--resume", str(out), cwd=tmp_path)
    _nothing_ran(proc)
    assert f"fl-clip21: error: --resume: checkpoint {str(broken)!r} cannot be opened as .npz" in proc.stderr
    assert _tree(out / CHECKPOINT) == before
    assert CHECKPOINT in json.loads((out / MANIFEST).read_text())["trees"]


def test_cli_resume_with_an_edited_config_names_the_key_and_both_values(tmp_path):
    from fl_clip21 import checkpoint as ckpt

    # Prepare: a checkpoint made with tau=1.0, then tau edited in checkpoint/config.json.
    out = tmp_path / "out"
    _killed_run(out)
    saved = out / CHECKPOINT / "config.json"
    cfg = json.loads(saved.read_text())
    path = out / CHECKPOINT / "run-0" / "clip21-gd.npz"
    path.parent.mkdir()
    ckpt.save(path, {"params": {"x": np.zeros(1)}}, {"algorithm": "clip21-gd", "config": cfg, "round": 1})
    saved.write_text(json.dumps({**cfg, "tau": 2.0}))
    before = _tree(out / CHECKPOINT)
    # Execute
    proc = _cli("run", "--resume", str(out), cwd=tmp_path)
    # Assert
    _nothing_ran(proc)
    assert f"--resume: checkpoint {str(path)!r} was made with tau=1.0, this run has tau=2.0" in proc.stderr
    assert _tree(out / CHECKPOINT) == before
    saved.write_text(json.dumps({**cfg, "tau": -1.0}))  # and an edited value gets the scenario's rules
    proc = _cli("run", "--resume", str(out), cwd=tmp_path)
    _nothing_ran(proc)
    assert "tau must be > 0, got -1.0" in proc.stderr


def test_cli_resume_with_a_flipped_byte_in_the_copies_file_names_it_before_the_simulation(tmp_path, flower_task):
    # Before: the run started Ray, then exited 1 with SimulationError(CopiesError ...) and a "continue with
    # --resume" hint that could only fail again.
    from fake_grid import FakeGrid, train_reply
    from flwr.app import ConfigRecord

    from fl_clip21.algorithms import algorithm_from_config
    from fl_clip21.checkpoint import load
    from fl_clip21.config import expand_runs, resolve
    from fl_clip21.copies import HEADER_ALIGN
    from fl_clip21.flower import records as R
    from fl_clip21.flower import saved_state
    from fl_clip21.flower.strategy import Clip21Strategy
    from fl_clip21.problems import build_problem

    # Prepare: round 1 of clip21-gd checkpointed as the run does it, then a byte of client 1's copy flipped.
    out = tmp_path / "out"
    _killed_run(out)
    saved = json.loads((out / CHECKPOINT / "config.json").read_text())
    run = expand_runs(resolve({k: v for k, v in saved.items() if v is not None}))[0]  # as --resume reads it
    path = out / CHECKPOINT / "run-0" / "clip21-gd.npz"
    strategy = Clip21Strategy(algorithm=algorithm_from_config("clip21-gd", run), scenario=run,
                              num_clients=run["num-clients"], seed=run["seed"], checkpoint=path)
    grid = FakeGrid({10 + i: i for i in range(run["num-clients"])})
    msgs = strategy.configure_train(1, R.to_record(build_problem(run).init_params()), ConfigRecord({}), grid)
    strategy.aggregate_train(1, [train_reply(m, m.metadata.dst_node_id, {"x": np.full(1, 0.25)}, 1) for m in msgs])
    strategy.protocol.copies.close()
    arrays, meta = load(path)
    saved_state.check_copies(path, arrays, meta)  # intact: the check passes
    copies = saved_state.copies_path(path)
    slot = (copies.stat().st_size - HEADER_ALIGN) // (run["num-clients"] * saved_state.SLOTS)
    data = bytearray(copies.read_bytes())
    data[HEADER_ALIGN + 3 * slot + 16] ^= 0x40  # client 1, slot 1: its copy as of round 1, the checkpoint's
    copies.write_bytes(bytes(data))
    before = _tree(out / CHECKPOINT)
    # Execute
    proc = _cli("run", "--resume", str(out), cwd=tmp_path)
    # Assert: exit 2 naming the file, the client, the slot and the fault; nothing started, nothing lost.
    _nothing_ran(proc)
    assert f"fl-clip21: error: --resume: the server's copies file {str(copies)!r}, client 1 slot 1: checksum mismatch" \
        in proc.stderr
    assert "continue with" not in proc.stderr and "Ray" not in proc.stderr
    assert _tree(out / CHECKPOINT) == before


def test_cli_a_grid_run_prints_the_files_it_wrote(tmp_path):
    # Before: "wrote DIR/ (metrics.json, ...)" for a folder with no metrics.json.
    out = tmp_path / "grid"
    proc = _cli("run", str(MEAN), *FAST, "--set", "seeds=0,1", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[-1] == f"wrote {out}/: run/, summary.csv, summary.md"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "run", "summary.csv", "summary.md"])
    assert (out / "run" / "seed-1" / "metrics.json").is_file()


def test_cli_sweep_follows_the_same_rules(tmp_path):
    grid = ["--grid", "tau=0.5", "--set", "rounds=5"]
    out = tmp_path / "sweep"
    before = _user_files(out)
    refused = _cli("sweep", str(MEAN), *grid, "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and f"--out {str(out)!r} is not empty (2 entries)" in refused.stderr, refused.stderr
    assert "sweep [" not in refused.stderr and _tree(out) == before
    done = _cli("sweep", str(MEAN), *grid, "--out", str(out), "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {k: v for k, v in _tree(out).items() if k in before} == before
    assert done.stdout.rstrip().splitlines()[-1] == (
        f"wrote {out}/: heatmap-clip-gd.png, heatmap-clip21-gd.png, heatmap-gd.png, sweep.csv, sweep.md"
    )
    (tmp_path / "results" / "mean-estimation-sweep").mkdir(parents=True)  # empty, and still not reused
    default = _cli("sweep", str(MEAN), *grid, cwd=tmp_path)
    assert default.returncode == 0, default.stderr[-2000:]
    assert (tmp_path / "results" / "mean-estimation-sweep-2" / "sweep.csv").is_file()
    assert list((tmp_path / "results" / "mean-estimation-sweep").iterdir()) == []


def test_cli_a_config_error_is_one_line_and_exit_2(tmp_path):
    proc = _cli("run", str(MEAN), "--set", "tau=-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fl-clip21: error: tau must be > 0, got -1.0"]
    assert list(tmp_path.iterdir()) == []


def test_cli_resume_takes_no_out_or_overwrite(tmp_path):
    for extra in (["--out", str(tmp_path / "x")], ["--overwrite"]):
        proc = _cli("run", "--resume", str(tmp_path), *extra, cwd=tmp_path)
        assert proc.returncode == 2 and extra[0] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_an_unexpected_error_is_one_line_pointing_to_debug(tmp_path, monkeypatch, capsys):
    from fl_clip21 import cli, engine

    def broken(cfg, on_round=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "run_vectorized", broken)
    out = tmp_path / "out"
    assert cli.main(["run", str(MEAN), *FAST, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["fl-clip21: error: RuntimeError: boom (run again with --debug for the traceback)"]
    assert not out.exists()  # the run's own folder went with it
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["run", str(MEAN), *FAST, "--out", str(out), "--debug"])
    assert not out.exists()


def test_cli_bench_refuses_an_existing_out_before_running(tmp_path, capsys):
    from fl_clip21.cli import main

    out = tmp_path / "bench.json"
    out.write_text("my earlier bench\n")
    assert main(["bench", "--clients", "3", "--rounds", "1", "--repeats", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} exists" in err and "--overwrite" in err
    assert _tree(tmp_path) == {"bench.json": b"my earlier bench\n"}
