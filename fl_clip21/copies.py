"""The server's copy of every client's memory v_i, kept in a file, not in RAM.

The server needs its copy of a client's memory only to repair a fault: to
resync a client whose increment it did not apply, or that lost its state,
and to resync every client after a restart from a checkpoint. Held in RAM,
these copies would double the memory every client adds (n more models on
the server). Here they live in one file, read only for a resync and updated
as increments are applied; the process holds none of them.

Layout: one row per client, each of ``slots`` slots; a slot is an int64 tag
(the round of the last increment the copy holds, 0 for none) and the model's
arrays as raw bytes, in key order and in their own dtypes. The file starts
sparse (all zeros: every copy is the zero memory of round 0). With two slots
(when the server checkpoints), an update never overwrites the copy that the
last checkpoint refers to: a server that dies mid-round and resumes from that
checkpoint finds every client's copy as of the checkpoint's round.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fl_clip21 import core
from fl_clip21.core import Params

_TAG = np.dtype("<i8")


class CopiesError(RuntimeError):
    """The copies file cannot give what is asked (missing, wrong size, or out of step)."""


class MemoryCopies:
    """``num_clients`` copies of a memory shaped like ``layout``, in the file ``path``.

    ``create=True`` makes a new (zero) file, replacing one that is there;
    ``create=False`` opens an existing one, which must have this layout.
    """

    def __init__(
        self, path: str | Path, layout: Mapping[str, np.ndarray], num_clients: int, slots: int = 1,
        create: bool = True,
    ) -> None:
        if slots not in (1, 2):
            raise ValueError(f"slots must be 1 or 2, got {slots!r}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
        self.path = Path(path)
        self.num_clients = num_clients
        self.slots = slots
        self._layout = {k: (np.dtype(v.dtype), tuple(np.shape(v))) for k, v in layout.items()}
        self._payload = sum(int(np.prod(s, dtype=np.int64)) * dt.itemsize for dt, s in self._layout.values())
        self._slot = _TAG.itemsize + self._payload
        self.size = num_clients * slots * self._slot
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.path.parent).free
            if free < self.size:
                raise CopiesError(
                    f"the server's copies of {num_clients} client memories need {self.size} bytes in "
                    f"{str(self.path.parent)!r}, which has {free} free"
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, self.size)  # sparse: zero copies, no disk used yet
        else:
            if not self.path.is_file():
                raise CopiesError(f"the server's copies file {str(self.path)!r} is missing")
            have = self.path.stat().st_size
            if have != self.size:
                raise CopiesError(
                    f"the server's copies file {str(self.path)!r} has {have} bytes; {num_clients} clients "
                    f"x {slots} slots of this model need {self.size}"
                )
            fd = os.open(self.path, os.O_RDWR)
        self._fd: int | None = fd
        # The tags, mirrored in RAM (8 bytes a slot): a read or an update is one system call.
        self._tags = np.zeros((num_clients, slots), dtype=np.int64)
        if not create:
            for client in range(num_clients):
                for slot in range(slots):
                    raw = self._read(self._offset(client, slot), _TAG.itemsize)
                    self._tags[client, slot] = int(np.frombuffer(raw, dtype=_TAG)[0])

    # --- rows -------------------------------------------------------------------

    def _offset(self, client: int, slot: int) -> int:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client must be in [0, {self.num_clients}), got {client!r}")
        return (client * self.slots + slot) * self._slot

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            raise CopiesError(f"the server's copies file {str(self.path)!r} is closed")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise CopiesError(f"short read of {str(self.path)!r} at byte {offset}: {len(data)} of {size}")
        return data

    def _find(self, client: int, round_: int) -> int:
        """The slot holding ``client``'s copy as of ``round_``."""
        self._offset(client, 0)  # checks the index
        for slot in range(self.slots):
            if self._tags[client, slot] == round_:
                return slot
        tags = self._tags[client].tolist()
        raise CopiesError(
            f"the server's copy of client {client} as of round {round_} is not in {str(self.path)!r} "
            f"(it holds rounds {tags}): the file does not belong to this run or checkpoint"
        )

    def _view(self, client: int, slot: int) -> Params:
        """The copy in ``client``'s ``slot``, as read-only arrays over the bytes read."""
        raw = self._read(self._offset(client, slot) + _TAG.itemsize, self._payload)
        out, start = {}, 0
        for k, (dtype, shape) in self._layout.items():
            count = int(np.prod(shape, dtype=np.int64))
            out[k] = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
            start += count * dtype.itemsize
        return out

    def _write(self, client: int, slot: int, value: Mapping[str, np.ndarray], round_: int) -> None:
        """Write ``value``, tagged ``round_``, to ``client``'s ``slot`` (one system call, no joined copy)."""
        if self._fd is None:
            raise CopiesError(f"the server's copies file {str(self.path)!r} is closed")
        buffers = [np.asarray(round_, dtype=_TAG).tobytes()]
        for k, (dtype, shape) in self._layout.items():
            arr = np.asarray(value[k], dtype=dtype)
            if arr.shape != shape:
                raise ValueError(f"copy of client {client}: array {k!r} has shape {arr.shape}, the model's is {shape}")
            buffers.append(np.ascontiguousarray(arr))
        offset = self._offset(client, slot)
        try:
            written = os.pwritev(self._fd, buffers, offset)
        except OSError as e:
            raise CopiesError(f"cannot write the server's copy of client {client} to {str(self.path)!r}: {e}") from e
        if written != self._slot:
            raise CopiesError(f"short write to {str(self.path)!r} at byte {offset}: {written} of {self._slot}")
        self._tags[client, slot] = round_

    def get(self, client: int, round_: int) -> Params:
        """``client``'s copy holding its increments up to ``round_`` (new arrays)."""
        return {k: v.copy() for k, v in self._view(client, self._find(client, round_)).items()}

    def put(self, client: int, value: Mapping[str, np.ndarray], round_: int, keep: int | None = None) -> None:
        """Make ``value`` ``client``'s copy as of ``round_``.

        With two slots the slot that holds round ``keep`` (the copy the last
        checkpoint refers to) is left as it is.
        """
        slot = 1 - self._find(client, keep) if self.slots == 2 and keep is not None else 0
        self._write(client, slot, value, round_)

    def add(self, client: int, increment: Mapping[str, np.ndarray], last_round: int, round_: int) -> None:
        """Add ``increment`` (of ``round_``) to the copy as of ``last_round`` (kept, with two slots)."""
        slot = self._find(client, last_round)
        self._write(client, 1 - slot if self.slots == 2 else 0, core.add(self._view(client, slot), increment), round_)

    def flush(self) -> None:
        """Put what was written on disk (before a checkpoint that refers to it)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
