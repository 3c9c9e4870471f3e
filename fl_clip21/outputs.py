"""Output folders and files that never lose anything.

The rules every command follows (``fl-clip21 run``, ``sweep``, ``bench`` and the
``flwr run`` ServerApp):

- Without an explicit folder a run claims a new one, ``results/NAME``, else
  ``results/NAME-2``, ``-3``, ... (created with ``mkdir``, so never an existing
  folder, even an empty one, and never one that a concurrent run claimed).
- An explicit folder must be new or empty. A folder holding this run's own
  checkpoint is taken with ``resume``; with ``overwrite`` the files fl-clip21
  wrote there before, as :data:`MANIFEST` records them, are replaced or
  removed and every other file is left alone; a file it did not write that has
  the name of an output refuses the run before it starts.
- The folder is locked for the whole run: :func:`fcntl.flock` on :data:`LOCK`
  in it, which holds the holder's pid for the message another process gets.
- Outputs are written into :data:`STAGING` inside the folder and moved into
  place only once all of them are written; a failed run removes them and
  keeps only the checkpoint of an interrupted Flower-engine run
  (:data:`CHECKPOINT`), which a finished run removes.

Paths in the manifest are relative POSIX paths: ``files`` and ``folders``
fl-clip21 wrote (a folder is removed only once empty), and ``trees``, folders
whose whole content is fl-clip21's (the checkpoint, the staging folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TypeVar

MANIFEST = ".fl-clip21-manifest.json"
LOCK = ".fl-clip21.lock"
STAGING = ".fl-clip21-staging"
CHECKPOINT = "checkpoint"
RESULTS = Path("results")
_VERSION = 1

T = TypeVar("T")


class OutputError(Exception):
    """An output folder or file that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Wording:
    """How the messages name the setting of the folder and the flags that change the rules."""

    param: str = "--out"
    overwrite: str = "--overwrite"
    new: str = "leave out --out for a new one under results/"


@dataclass(frozen=True)
class Manifest:
    """What fl-clip21 wrote into an output folder (relative POSIX paths)."""

    files: frozenset[str] = frozenset()
    folders: frozenset[str] = frozenset()
    trees: frozenset[str] = frozenset()

    def owns(self, rel: str) -> bool:
        """Whether fl-clip21 wrote ``rel``: recorded, or inside a recorded tree."""
        if rel in self.files or rel in self.folders:
            return True
        parts = PurePosixPath(rel).parts
        return any("/".join(parts[:k]) in self.trees for k in range(1, len(parts) + 1))


def _relative(rel: object) -> str:
    """``rel`` if it is a plain relative path inside a folder, else ValueError."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"got {rel!r}")
    path = PurePosixPath(rel)
    if path.is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")) or "\0" in rel:
        raise ValueError(f"path {rel!r} leaves the folder")
    return str(path)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder`` (empty when it has none); OutputError when it is not one fl-clip21 wrote."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("fl-clip21-manifest") != _VERSION:
            raise ValueError(f"no 'fl-clip21-manifest': {_VERSION}")
        lists = {key: data.get(key, []) for key in ("files", "folders", "trees")}
        if not all(isinstance(v, list) for v in lists.values()):
            raise ValueError("files, folders and trees must be lists")
        return Manifest(**{key: frozenset(_relative(r) for r in v) for key, v in lists.items()})
    except FileNotFoundError:
        return Manifest()
    except (OSError, ValueError) as e:
        raise OutputError(f"{str(path)!r} is not a manifest fl-clip21 wrote ({e}): move it away") from None


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a crash leaves the old one or the new one."""
    data = {"fl-clip21-manifest": _VERSION, **{k: sorted(getattr(manifest, k)) for k in ("files", "folders", "trees")}}
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_folder(root: Path, name: str) -> Path:
    """Create and return ``root/name``, else ``root/name-2``, ``-3``, ...: a folder that did not exist.

    ``name`` must be a plain folder name, so the folder is always directly
    under ``root``.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise OutputError(
            f"name {name!r} must be a plain folder name (not empty, no '/', not '.' or '..') "
            f"to name a new folder under {str(root)!r}"
        )
    k = 1
    while True:
        folder = root / (name if k == 1 else f"{name}-{k}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            return folder
        except FileExistsError:
            k += 1
        except OSError as e:
            raise OutputError(
                f"no new folder for name {name!r} can be created under {str(root)!r}: {e.strerror}"
            ) from None


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, outermost first."""
    created = []
    for p in [p for p in [folder, *folder.parents] if not p.exists()][::-1]:
        try:
            p.mkdir()
            created.append(p)
        except FileExistsError:  # made meanwhile by another run, whose lock decides
            continue
    return created


def _entries(path: Path) -> list[str]:
    """Names in a folder, sorted."""
    return sorted(os.listdir(path))


def _is_dir(path: Path) -> bool:
    """A folder, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """The pid a lock holder wrote in its lock file; it writes it once it has checked the folder."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def _lock(path: Path, shown: str, wording: Wording) -> tuple[int, bool]:
    """Take the lock file ``path``: ``(fd, created)``; OutputError naming the holder's pid when it is held."""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_NOFOLLOW), False
            except FileNotFoundError:  # its holder removed it meanwhile
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"{wording.param} {shown!r} is in use by another fl-clip21 run (pid {pid}): "
                "wait until it ends, or choose another folder"
            ) from None
        # A holder removes the file when it ends: a lock on the file it removed guards nothing.
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


@dataclass
class Output:
    """An output folder this process holds (locked) until :meth:`commit` or :meth:`abort`.

    Write every output under :attr:`staging`; a checkpoint goes straight to
    ``folder / CHECKPOINT``. Used as a context manager, an exception aborts.
    """

    folder: Path
    shown: str
    manifest: Manifest
    wording: Wording
    created: list[Path] = field(default_factory=list)
    fd: int | None = None

    @property
    def staging(self) -> Path:
        return self.folder / STAGING

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is not None:
            self.abort()

    def write(self, writer: Callable[[Path], T]) -> T:
        """``writer(self.staging)``; an OSError becomes an OutputError naming the folder."""
        try:
            return writer(self.staging)
        except OSError as e:
            raise OutputError(f"{self.wording.param} {self.shown!r}: the outputs cannot be written: {e}") from None

    def wrote(self, names: list[str]) -> str:
        """``wrote results/x/: config.json, metrics.json, ...``: the last line of a command."""
        return f"wrote {self.shown.rstrip('/')}/: {', '.join(names)}"

    def _remove(self, rel: str) -> bool:
        """Remove what fl-clip21 wrote at ``rel`` (a folder only once empty); whether it is gone."""
        path = self.folder / rel
        if any(not _is_dir(self.folder / p) for p in PurePosixPath(rel).parents if str(p) != "."):
            return False  # a link where a folder was: what it points to is not ours
        if not os.path.lexists(path):
            return True
        if rel in self.manifest.trees and _is_dir(path):
            shutil.rmtree(path)
            return True
        if _is_dir(path):
            for name in _entries(path):
                child = f"{rel}/{name}"
                if self.manifest.owns(child):
                    self._remove(child)
            if _entries(path):
                return False
            path.rmdir()
            return True
        path.unlink()
        return True

    def commit(self) -> list[str]:
        """Move the staged outputs into place, remove the checkpoint, release the folder.

        Earlier outputs (recorded in the manifest) that this run did not write
        again are removed; returns the top-level names written (folders end in
        ``/``).
        """
        files, folders = [], []
        for parent, dirs, names in os.walk(self.staging):
            rel = Path(parent).relative_to(self.staging)
            folders += [(rel / d).as_posix() for d in dirs]
            files += [(rel / n).as_posix() for n in names]
        foreign = [r for r in files + folders if os.path.lexists(self.folder / r) and not self.manifest.owns(r)]
        if foreign:
            # Out of the staging folder, which abort() removes: the user takes them from there.
            kept = Path(tempfile.mkdtemp(prefix=".fl-clip21-outputs-", dir=self.folder))
            os.replace(self.staging, kept)
            raise OutputError(
                f"{self.wording.param} {self.shown!r} now holds {foreign[0]!r}, which fl-clip21 did not write: "
                f"this run's outputs are in {str(kept)!r}"
            )
        try:
            # Recorded before anything moves: a crash halfway leaves nothing that looks like a user's file.
            self.manifest = replace(
                self.manifest, files=self.manifest.files | set(files), folders=self.manifest.folders | set(folders)
            )
            _write_manifest(self.folder, self.manifest)
            for rel in sorted(folders):
                target = self.folder / rel
                if os.path.lexists(target) and not _is_dir(target):
                    self._remove(rel)
                target.mkdir(exist_ok=True)
            for rel in files:
                if _is_dir(self.folder / rel) and not self._remove(rel):
                    raise OutputError(
                        f"{self.wording.param} {self.shown!r}: {rel!r} is a folder holding files fl-clip21 did not "
                        "write, where this run writes a file: move it away"
                    )
                os.replace(self.staging / rel, self.folder / rel)
            for rel in sorted(self.manifest.files - set(files) - {LOCK}):
                self._remove(rel)
            kept = {r for r in self.manifest.folders - set(folders) if not self._remove(r)}
            for rel in sorted(self.manifest.trees):
                self._remove(rel)
            self.manifest = Manifest(frozenset(files), frozenset(folders) | kept)
            _write_manifest(self.folder, self.manifest)
        except OSError as e:
            raise OutputError(
                f"{self.wording.param} {self.shown!r}: the outputs cannot be moved into place: {e}"
            ) from None
        self._release()
        return sorted({PurePosixPath(r).parts[0] + ("/" if "/" in r else "") for r in files})

    def abort(self) -> None:
        """Remove the staged outputs and release the folder; keep an interrupted run's checkpoint.

        A folder left with nothing fl-clip21 wrote loses its manifest too, and
        is removed if this run created it.
        """
        self._remove(STAGING)
        keep = frozenset(t for t in self.manifest.trees - {STAGING} if _is_dir(self.folder / t))
        self.manifest = replace(self.manifest, files=self.manifest.files - {LOCK}, trees=keep)
        if self.manifest == Manifest():
            (self.folder / MANIFEST).unlink(missing_ok=True)
            self._release()
            _remove_created(self.created)
            return
        _write_manifest(self.folder, self.manifest)
        self._release()

    def _release(self) -> None:
        """Remove the lock file, then give up the lock (see :func:`_lock`)."""
        if self.fd is not None:
            (self.folder / LOCK).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _planned(planned: Iterable[str], checkpoint: bool) -> list[str]:
    """Every path a run may write: its files, the folders above them, the staging folder, the checkpoint."""
    out = {STAGING, *([CHECKPOINT] if checkpoint else [])}
    for rel in planned:
        parts = PurePosixPath(_relative(rel)).parts
        out.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return sorted(out)


def claim(
    out: Path | str | None,
    *,
    name: str,
    planned: Iterable[str],
    overwrite: bool = False,
    resume: bool = False,
    checkpoint: bool = False,
    root: Path = RESULTS,
    wording: Wording = Wording(),
) -> Output:
    """Take an output folder for a run, before the run starts; OutputError says why it cannot.

    A refused folder is left as it was. See the module docstring for the rules.

    Parameters
    ----------
    out:
        The folder asked for (``--out``); None claims :func:`new_folder` ``(root, name)``.
    name:
        The scenario's name, for the new folder.
    planned:
        Every file the run may write, relative to the folder (optional ones
        included): a file of the user's at one of them, or where a folder above
        one goes, refuses the folder.
    overwrite:
        Take a non-empty folder, replacing what its manifest records, and
        discarding an interrupted run's checkpoint.
    resume:
        Take the folder's interrupted run, whose checkpoint the manifest must record.
    checkpoint:
        The run writes :data:`CHECKPOINT` in the folder as it goes (kept if it fails).
    root:
        Where new folders go.
    wording:
        How messages name the setting and the flags.
    """
    if out is None:
        folder = new_folder(Path(root), name)
        shown, created = str(folder), [folder]
    else:
        shown, folder = str(out), Path(os.path.abspath(out))
        if os.path.lexists(folder) and not folder.is_dir():
            raise OutputError(f"{wording.param} {shown!r} is a file, not a folder: choose a folder")
        try:
            created = _make_folder(folder)
        except OSError as e:
            raise OutputError(f"{wording.param} {shown!r} cannot be created: {e.strerror}") from None
    output = Output(folder, shown, Manifest(), wording, created)
    made_lock = False
    try:
        output.fd, made_lock = _lock(folder / LOCK, shown, wording)
        output.manifest = read_manifest(folder)
        # A lock file no manifest records may be a killed run's (just its pid) or a user's file.
        ours = made_lock or LOCK in output.manifest.files or re.fullmatch(rb"\d*\s*", os.pread(output.fd, 64, 0))
        if not ours:
            raise OutputError(f"{wording.param} {shown!r} holds {LOCK!r}, which fl-clip21 did not write: move it away")
        _check(output, _planned(planned, checkpoint), overwrite, resume)
        os.ftruncate(output.fd, 0)
        os.pwrite(output.fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException as e:
        if output.fd is not None:
            if made_lock:
                (folder / LOCK).unlink(missing_ok=True)
            os.close(output.fd)
        _remove_created(created)
        if isinstance(e, OSError):
            raise OutputError(f"{wording.param} {shown!r} cannot be written: {e.strerror or e}") from None
        raise
    try:
        manifest = output.manifest
        if STAGING in manifest.trees:
            output._remove(STAGING)  # of a run that was killed: the lock says none is running
        if overwrite and CHECKPOINT in manifest.trees:
            output._remove(CHECKPOINT)
        trees = (manifest.trees - {CHECKPOINT}) | {STAGING, *([CHECKPOINT] if checkpoint else [])}
        output.manifest = replace(manifest, files=manifest.files | {LOCK}, trees=trees)
        _write_manifest(folder, output.manifest)
        output.staging.mkdir()
    except BaseException as e:
        output.abort()
        if isinstance(e, OSError):
            raise OutputError(f"{wording.param} {shown!r} cannot be written: {e.strerror or e}") from None
        raise
    return output


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a refused or failed run created, innermost first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was put there meanwhile
            return


def _check(output: Output, planned: list[str], overwrite: bool, resume: bool) -> None:
    """The rules on what the folder holds, with its lock held."""
    folder, shown, wording, manifest = output.folder, output.shown, output.wording, output.manifest
    interrupted = CHECKPOINT in manifest.trees and _is_dir(folder / CHECKPOINT)
    if resume and not interrupted:
        raise OutputError(
            f"{wording.param} {shown!r} holds no interrupted run ({MANIFEST} records no {CHECKPOINT}/ of fl-clip21)"
        )
    if interrupted and not resume and not overwrite:
        raise OutputError(
            f"{wording.param} {shown!r} holds an interrupted run: continue it with --resume {shown}, "
            f"or {wording.overwrite} to discard it"
        )
    # The lock file is this run's by now, the manifest is read; a staging folder not in it is someone's.
    entries = [e for e in _entries(folder) if e not in (LOCK, MANIFEST) and not (e == STAGING and manifest.owns(e))]
    if entries and not overwrite and not resume:
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise OutputError(
            f"{wording.param} {shown!r} is not empty ({count}): choose another folder, {wording.new}, "
            f"or give {wording.overwrite} to replace the outputs of an earlier fl-clip21 run there "
            "(files fl-clip21 did not write are left alone)"
        )
    for rel in planned:
        if os.path.lexists(folder / rel) and not manifest.owns(rel):
            raise OutputError(
                f"{wording.param} {shown!r} holds {rel!r}, which fl-clip21 did not write (it is not in {MANIFEST}) "
                "and where this run writes: move it away, or choose another folder"
            )


@dataclass
class StagedFile:
    """A file written to :attr:`tmp` beside its target, then moved over it by :meth:`commit`."""

    path: Path
    shown: str
    tmp: Path
    overwrite: bool
    wording: Wording

    def commit(self) -> None:
        """Move the written file into place (over an existing one only with ``overwrite``)."""
        if not self.overwrite and os.path.lexists(self.path):
            raise OutputError(
                f"{self.wording.param} {self.shown!r} appeared during the run: move it away; "
                f"this run's output is in {str(self.tmp)!r}"
            )
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def stage_file(path: Path | str, *, overwrite: bool = False, wording: Wording = Wording()) -> StagedFile:
    """Reserve an output file before a run: a temporary file beside it; OutputError says why it cannot be.

    Parameters
    ----------
    path:
        The file asked for (``--out``); its folder must exist.
    overwrite:
        Replace an existing file; without it an existing file is refused.
    wording:
        How messages name the setting and the flag.
    """
    shown, target = str(path), Path(os.path.abspath(path))
    if target.is_dir():
        raise OutputError(f"{wording.param} {shown!r} is a folder, not a file: name a file")
    if os.path.lexists(target) and not overwrite:
        raise OutputError(
            f"{wording.param} {shown!r} exists: choose another file, or give {wording.overwrite} to replace it"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise OutputError(f"{wording.param} {shown!r} cannot be written: {e.strerror}") from None
    os.close(fd)
    return StagedFile(target, shown, Path(tmp), overwrite, wording)
