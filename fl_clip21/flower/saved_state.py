"""The strategy's state in a checkpoint: what is saved, and what a resume checks and restores.

A checkpoint (:mod:`fl_clip21.checkpoint`: an ``.npz`` with checksums) holds
the model ``params``, the algorithm's server state (``server.g``...) and JSON
metadata: the algorithm, its hyper-parameters, n, the seed, the resolved
configuration, the session id, the rounds done, every round's record, the
protocol state (acks, times asked, resets) and the registry's last node of
every client. The copies of the clients' memories are not inside: they are in
their own file (:class:`~fl_clip21.copies.MemoryCopies`, with a checksum per
slot) beside the checkpoint, named in the metadata (``copies``).

:func:`load` refuses a checkpoint made with another algorithm,
hyper-parameters, n, seed or configuration (naming the key and both values);
:func:`open_copies` refuses a copies file that is missing, corrupted, of
another model or count, or without the slot the checkpoint refers to for a
client; :func:`check_copies` runs that check alone, changing nothing, for the
command line to call before a simulation starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_clip21 import checkpoint as ckpt
from fl_clip21.copies import MemoryCopies
from fl_clip21.core import Params

COPIES_SUFFIX = ".copies"
SLOTS = 2  # a checkpointing server keeps two slots a client (copies.py: the checkpoint's is never overwritten)


def copies_path(checkpoint: Path) -> Path:
    """The copies file that goes with ``checkpoint`` (same folder, same name, ``.copies``)."""
    return checkpoint.with_name(checkpoint.name + COPIES_SUFFIX)


@dataclass(frozen=True)
class Saved:
    """A checkpoint's content, parsed (not yet checked against a copies file).

    Attributes
    ----------
    params, server_state:
        The model and the algorithm's server state (``g``...), as saved.
    num_clients, session, round, history:
        n, the run's session id, the rounds completed and their records.
    protocol, registry:
        :meth:`ProtocolState.state_dict` and :meth:`NodeRegistry.state_dict`.
    copies:
        The name of the copies file beside the checkpoint; None for an
        algorithm whose clients keep no memory, or a checkpoint written
        before the copies file (its copies are arrays ``shadow.I``).
    arrays:
        Every array group of the file (for such an old checkpoint's copies).
    """

    params: Params
    server_state: Params
    num_clients: int
    session: str
    round: int
    history: list[dict[str, Any]]
    protocol: dict[str, Any]
    registry: dict[str, Any]
    copies: str | None
    arrays: dict[str, Params]

    @property
    def last_applied(self) -> list[int]:
        """Per client, the round of the last increment its copy holds (the slot the checkpoint refers to)."""
        return [int(r) for r in self.protocol["last_applied"]]


def save(path: Path, params: Params, server_state: Params, meta: dict[str, Any], copies: MemoryCopies | None) -> None:
    """Write the checkpoint ``path`` atomically, after putting the copies it refers to on disk."""
    if copies is not None:
        copies.flush()
    ckpt.save(path, {"params": params, **{f"server.{k}": v for k, v in server_state.items()}}, meta)


@contextlib.contextmanager
def malformed(path: Path) -> Iterator[None]:
    """Within the block, a KeyError, TypeError or ValueError is a :class:`CheckpointError` naming ``path``."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ckpt.CheckpointError):
            raise
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} is incomplete or malformed ({type(e).__name__}: {e})"
        ) from None


def parse(path: Path, arrays: dict[str, Params], meta: Mapping[str, Any]) -> Saved:
    """The checkpoint's content; :class:`CheckpointError` for a missing or malformed part."""
    with malformed(path):
        n = meta["num_clients"]
        if type(n) is not int or n < 1:  # noqa: E721 - a bool is no client count
            raise ValueError(f"num_clients must be an integer >= 1, got {n!r}")
        protocol = meta.get("protocol") or {k: meta[k] for k in ("times_asked", "last_applied")}
        registry = meta.get("registry", {})
        copies = meta.get("copies")
        if not isinstance(protocol, dict) or not isinstance(registry, dict):
            raise TypeError("protocol and registry must be JSON objects")
        if copies is not None and not _plain_copies_name(copies):
            raise ValueError(f"copies must be a file name ending in {COPIES_SUFFIX!r} beside it, got {copies!r}")
        saved = Saved(
            params=arrays["params"],
            server_state={g.removeprefix("server."): v for g, v in arrays.items() if g.startswith("server.")},
            num_clients=n, session=str(meta["session"]), round=int(meta["round"]), history=list(meta["history"]),
            protocol=protocol, registry=registry, copies=copies, arrays=arrays,
        )
        if len(saved.last_applied) != n:
            raise ValueError(f"protocol state has {len(saved.last_applied)} clients' acks, num_clients is {n}")
    return saved


def _plain_copies_name(name: object) -> bool:
    return isinstance(name, str) and name == Path(name).name and name.endswith(COPIES_SUFFIX) and name != COPIES_SUFFIX


def load(
    path: Path, *, algorithm: str, hyper: Mapping[str, Any], num_clients: int | None, seed: int,
    config: Mapping[str, Any],
) -> Saved:
    """Read and verify the checkpoint ``path``, made by this run's algorithm and configuration.

    ``num_clients`` None takes the checkpoint's n (a run that counted its
    nodes). Any difference in the algorithm, ``hyper``, n, ``seed`` or
    ``config`` (when both sides have one) is a :class:`CheckpointError`
    naming the key and both values.
    """
    arrays, meta = ckpt.load(path)
    what = f"checkpoint {str(path)!r}"
    if num_clients is None and type(meta.get("num_clients")) is int and meta["num_clients"] >= 1:
        num_clients = meta["num_clients"]  # counted when the run started
    current = {"algorithm": algorithm, "hyper": dict(hyper), "num_clients": num_clients, "seed": seed}
    made = {k: meta[k] for k in current if k in meta}
    ckpt.compare_config(made, {k: current[k] for k in made}, what)
    if meta.get("config") and config:
        ckpt.compare_config(meta["config"], config, what)
    return parse(path, arrays, meta)


def open_copies(path: Path, saved: Saved) -> MemoryCopies:
    """The copies file the checkpoint ``path`` refers to, verified.

    Raises :class:`~fl_clip21.copies.CopiesError` naming the file and what is
    wrong: missing, truncated, of another format, model or client count, a
    slot whose checksum does not match, or no slot of the round the
    checkpoint says a client's copy is at.
    """
    if saved.copies is None:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} has no copies file of the clients' memories")
    copies = MemoryCopies(path.with_name(saved.copies), saved.params, saved.num_clients, slots=SLOTS, create=False)
    try:
        for client, round_ in enumerate(saved.last_applied):
            copies.require(client, round_)
    except BaseException:
        copies.close()
        raise
    return copies


def restore_copies(
    path: Path, saved: Saved, new: Callable[[], MemoryCopies], carry_on_in: Path | None = None
) -> MemoryCopies:
    """The run's copies file, as of the checkpoint ``path``.

    ``carry_on_in``: the copies file this run writes, when it is the one the
    checkpoint refers to (it is then used as it is); otherwise ``new()`` makes
    the run's file and every client's copy is carried over into it.
    """
    if saved.copies is None and "shadow.0" in saved.arrays:  # written before the copies file: they are inside
        copies = new()
        for i, round_ in enumerate(saved.last_applied):
            copies.put(i, saved.arrays[f"shadow.{i}"], round_)
        return copies
    source = open_copies(path, saved)
    if carry_on_in is not None and source.path.resolve() == carry_on_in.resolve():
        return source
    try:
        copies = new()
        for i, round_ in enumerate(saved.last_applied):
            copies.put(i, source.get(i, round_), round_)
    finally:
        source.close()
    return copies


def check_copies(path: Path, arrays: dict[str, Params], meta: Mapping[str, Any]) -> None:
    """Verify the copies file that the checkpoint ``path`` (read: ``arrays``, ``meta``) refers to; change nothing.

    For the command line, before a simulation starts. Raises
    :class:`CheckpointError` for a malformed checkpoint or
    :class:`~fl_clip21.copies.CopiesError` (see :func:`open_copies`).
    """
    saved = parse(path, arrays, meta)
    if saved.copies is not None:
        open_copies(path, saved).close()
