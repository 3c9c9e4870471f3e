"""The server's copy of every client's memory v_i, kept in a file, not in RAM.

The server needs its copy of a client's memory only to repair a fault: to
resync a client whose increment it did not apply, or that lost its state,
and to resync every client after a restart from a checkpoint. Held in RAM,
these copies would double the memory every client adds (n more models on
the server). Here they live in one file, read only for a resync and updated
as increments are applied; the process holds none of them.

File format 2 (format 1, before checksums, had no header and is refused):

- a header of :data:`HEADER_ALIGN` bytes (more for a model of very many
  arrays): ``struct`` ``"<8sIIQ"`` = the magic :data:`MAGIC`, the format
  version, the length of the JSON that follows and its xxh3-64, then that
  JSON: ``num_clients``, ``slots``, ``layout`` (each array's ``[name,
  dtype, shape]``, in key order) and ``slot_bytes``, zero-padded;
- one row per client, each of ``slots`` slots; a slot is an int64 tag (the
  round of the last increment the copy holds, 0 for none), a uint64
  checksum, and the model's arrays as raw bytes, in key order and in their
  own dtypes.

The checksum is the xxh3-64 of (payload, tag, client, slot) XOR that of a
zero slot at the same place, so an unwritten slot (all zeros) checks without
having been written and the file starts sparse (every copy is the zero
memory of round 0). Every read of a slot verifies it, and opening an
existing file verifies them all: a flipped byte, a truncated file or a slot
moved to another place raises :class:`CopiesError` instead of giving wrong
data. xxh3 rather than zlib.crc32 or hashlib: at d=100,000 it costs 16 us a
copy where crc32 takes 200 us and blake2b 4.7 ms, and an update hashes two
copies (the one it reads and the one it writes).

With two slots (when the server checkpoints), an update never overwrites the
copy that the last checkpoint refers to: a server that dies mid-round and
resumes from that checkpoint finds every client's copy as of the
checkpoint's round.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fl_clip21 import core
from fl_clip21.core import Params

MAGIC = b"FLC21CPY"
VERSION = 2
HEADER_ALIGN = 4096  # the rows start on a page
_HEAD = struct.Struct("<8sIIQ")  # magic, version, JSON length, xxh3-64 of the JSON
_SLOT_HEAD = struct.Struct("<qQ")  # tag, checksum
_PLACE = struct.Struct("<qqq")  # tag, client, slot: hashed after the payload


class CopiesError(RuntimeError):
    """The copies file cannot give what is asked (missing, corrupted, of another run, or out of step)."""


class MemoryCopies:
    """``num_clients`` copies of a memory shaped like ``layout``, in the file ``path``.

    ``create=True`` makes a new (zero) file, replacing one that is there;
    ``create=False`` opens an existing one, which must have this layout, and
    verifies every slot. :attr:`size` is the file's length in bytes, header
    included.
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
        self._slot = _SLOT_HEAD.size + self._payload
        self._describe = {  # the layout before slot_bytes: a difference is named by its array
            "num_clients": num_clients, "slots": slots,
            "layout": [[k, dt.str, list(s)] for k, (dt, s) in self._layout.items()], "slot_bytes": self._slot,
        }
        header = _header(self._describe)
        self._start = len(header)
        self.size = self._start + num_clients * slots * self._slot
        self._zero = _zero_hash(self._payload)
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
            os.pwrite(fd, header, 0)
        else:
            if not self.path.is_file():
                raise CopiesError(f"the server's copies file {str(self.path)!r} is missing")
            fd = os.open(self.path, os.O_RDWR)
        self._fd: int | None = fd
        # The tags, mirrored in RAM (8 bytes a slot): a read or an update is one system call.
        self._tags = np.zeros((num_clients, slots), dtype=np.int64)
        if not create:
            try:
                self._check_header()
                for client in range(num_clients):
                    for slot in range(slots):
                        self._tags[client, slot] = self._verified(client, slot, self._read_slot(client, slot))
            except BaseException:  # a refused file is not left open
                self.close()
                raise

    # --- header -----------------------------------------------------------------

    def _check_header(self) -> None:
        """Refuse a file of another format, model or client count, or a truncated one."""
        where, fd = f"the server's copies file {str(self.path)!r}", self._fd_open()
        have = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD.size, 0)
        if len(head) < _HEAD.size:
            raise CopiesError(f"{where} is truncated: {have} bytes, shorter than its {_HEAD.size}-byte header")
        magic, version, length, digest = _HEAD.unpack(head)
        if magic != MAGIC:
            raise CopiesError(
                f"{where} does not start with {MAGIC!r} (it starts with {magic!r}): it is not a copies file, "
                f"or one of format 1 (before checksums), which this version does not read"
            )
        if version != VERSION:
            raise CopiesError(f"{where} has format version {version}; this version of fl-clip21 reads {VERSION}")
        if have < _HEAD.size + length:  # checked before reading: a corrupted length may be 4 GB
            raise CopiesError(f"{where} is truncated: {have} bytes, inside its header of {_HEAD.size + length}")
        raw = os.pread(fd, length, _HEAD.size)
        if xxhash.xxh3_64_intdigest(raw) != digest:
            raise CopiesError(f"{where}: header checksum mismatch (the layout description is corrupted)")
        try:
            found = json.loads(raw)
        except ValueError as e:
            raise CopiesError(f"{where}: header is not JSON ({e})") from e
        if not isinstance(found, dict):
            raise CopiesError(f"{where}: header is not a JSON object, got {type(found).__name__}")
        for key, want in self._describe.items():
            got = found.get(key)
            if got == want:
                continue
            if key == "layout":
                raise CopiesError(f"{where} holds copies of another model: {_first_difference(got, want)}")
            raise CopiesError(f"{where} was made with {key}={got!r}; this run needs {key}={want!r}")
        if have != self.size:
            state = "is truncated" if have < self.size else "is too long"
            raise CopiesError(
                f"{where} {state}: {have} bytes; its header and {self.num_clients} clients x {self.slots} slots of "
                f"{self._slot} bytes need {self.size}"
            )

    # --- slots ------------------------------------------------------------------

    def _offset(self, client: int, slot: int) -> int:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client must be in [0, {self.num_clients}), got {client!r}")
        return self._start + (client * self.slots + slot) * self._slot

    def _fd_open(self) -> int:
        if self._fd is None:
            raise CopiesError(f"the server's copies file {str(self.path)!r} is closed")
        return self._fd

    def _read_slot(self, client: int, slot: int) -> bytes:
        offset = self._offset(client, slot)
        data = os.pread(self._fd_open(), self._slot, offset)
        if len(data) != self._slot:
            raise CopiesError(
                f"the server's copies file {str(self.path)!r} is truncated: client {client} slot {slot} at byte "
                f"{offset}: read {len(data)} of {self._slot} bytes"
            )
        return data

    def _checksum(self, client: int, slot: int, tag: int, payload: list[Any]) -> int:
        """The checksum stored in a slot holding ``payload`` (buffers) tagged ``tag``."""
        h, zero = xxhash.xxh3_64(), self._zero.copy()
        for buffer in payload:
            h.update(buffer)
        h.update(_PLACE.pack(tag, client, slot))
        zero.update(_PLACE.pack(0, client, slot))
        return h.intdigest() ^ zero.intdigest()

    def _verified(self, client: int, slot: int, data: bytes) -> int:
        """The tag of the slot whose bytes are ``data``, after checking them."""
        tag, stored = _SLOT_HEAD.unpack_from(data)
        where = f"the server's copies file {str(self.path)!r}, client {client} slot {slot}"
        computed = self._checksum(client, slot, tag, [memoryview(data)[_SLOT_HEAD.size:]])
        if stored != computed:
            raise CopiesError(f"{where}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")
        if tag < 0:
            raise CopiesError(f"{where}: impossible tag {tag} (a round is >= 0)")
        return tag

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
        """The copy in ``client``'s ``slot``, verified, as read-only arrays over the bytes read."""
        raw = self._read_slot(client, slot)
        tag = self._verified(client, slot, raw)
        if tag != self._tags[client, slot]:
            raise CopiesError(
                f"the server's copies file {str(self.path)!r}, client {client} slot {slot}: holds round {tag}, "
                f"this process wrote round {int(self._tags[client, slot])} there (another process writes the file)"
            )
        out, start = {}, _SLOT_HEAD.size
        for k, (dtype, shape) in self._layout.items():
            count = int(np.prod(shape, dtype=np.int64))
            out[k] = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
            start += count * dtype.itemsize
        return out

    def _write(self, client: int, slot: int, value: Mapping[str, np.ndarray], round_: int) -> None:
        """Write ``value``, tagged ``round_``, to ``client``'s ``slot`` (one system call, no joined copy)."""
        fd = self._fd_open()
        if round_ < 0:
            raise ValueError(f"copy of client {client}: round must be >= 0, got {round_!r}")
        payload = []
        for k, (dtype, shape) in self._layout.items():
            arr = np.asarray(value[k], dtype=dtype)
            if arr.shape != shape:
                raise ValueError(f"copy of client {client}: array {k!r} has shape {arr.shape}, the model's is {shape}")
            payload.append(np.ascontiguousarray(arr))
        head = _SLOT_HEAD.pack(round_, self._checksum(client, slot, round_, payload))
        offset = self._offset(client, slot)
        try:
            written = os.pwritev(fd, [head, *payload], offset)
        except OSError as e:
            raise CopiesError(f"cannot write the server's copy of client {client} to {str(self.path)!r}: {e}") from e
        if written != self._slot:
            raise CopiesError(f"short write to {str(self.path)!r} at byte {offset}: {written} of {self._slot}")
        self._tags[client, slot] = round_

    def require(self, client: int, round_: int) -> None:
        """:class:`CopiesError` unless the file holds ``client``'s copy as of ``round_`` (its slots are verified)."""
        self._find(client, round_)

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


def _header(describe: Mapping[str, Any]) -> bytes:
    """The file's header for ``describe``, padded to a multiple of :data:`HEADER_ALIGN`."""
    raw = json.dumps(describe, separators=(",", ":")).encode()
    head = _HEAD.pack(MAGIC, VERSION, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw
    return head.ljust(-(-len(head) // HEADER_ALIGN) * HEADER_ALIGN, b"\0")


def _zero_hash(size: int) -> xxhash.xxh3_64:
    """The hash state after ``size`` zero bytes (a zero payload), fed in pieces of at most 1 MiB."""
    h, piece, left = xxhash.xxh3_64(), memoryview(bytes(min(size, 1 << 20))), size
    while left:
        h.update(piece[: min(left, len(piece))])
        left -= min(left, len(piece))
    return h


def _first_difference(got: Any, want: list[list[Any]]) -> str:
    """Where the layout ``got`` (from a file's header) differs from ``want`` (called only when it does)."""
    if not isinstance(got, list):
        return f"its layout is {got!r}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"array {i} is {a!r} (name, dtype, shape) in the file, {b!r} in this model"
    return f"the file's model has {len(got)} arrays, this one {len(want)}"
