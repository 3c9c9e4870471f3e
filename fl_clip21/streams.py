"""Counter-based random streams: every draw is a function of (seed, purpose, client, round, step, index).

A client's minibatch and noise in a round must not depend on which other
clients are computed with it, nor on the engine: the Flower client computes
one client, the batched engine thousands at once. So there is no generator
state at all: entry j of the stream (seed, purpose, client, round, step) is
SplitMix64's output at a counter made from those numbers (Steele, Lea and
Flood, "Fast splittable pseudorandom number generators", 2014), computed for
a whole (clients x entries) block in one vectorised call. Normal draws use the
Box-Muller transform on pairs of uniforms. The same arithmetic in torch gives
the same uniforms on a GPU, bit for bit (:func:`uniforms_torch`), and the same
normals to float rounding (:func:`normals_torch`: torch's log1p, cos and sin
may differ from numpy's in the last bit).
"""

from __future__ import annotations

import numpy as np

# The purposes a stream is drawn for; a new purpose gets a new number, never a reused one.
BATCH = 1  # minibatch rows
NOISE = 2  # DP noise a client adds to its message
SERVER_NOISE = 3  # DP noise the server adds to the sum of the messages (central DP)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of 64-bit words), element-wise."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _mix_int(x: int) -> int:
    """:func:`_mix` of one Python int (the stream keys are built from these)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_key(seed: int, purpose: int, server_round: int, step: int = 0) -> int:
    """The 64-bit key of the streams of one (seed, purpose, round, step); clients split it further."""
    key = _mix_int(int(seed) + 0x5EED)
    for part in (purpose, server_round, step):
        key = _mix_int(key ^ (_mix_int(int(part) + 0x632BE59BD9B4E019)))
    return key


def _bases(key: int, clients: np.ndarray) -> np.ndarray:
    c = np.asarray(clients, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(np.uint64(key) ^ _mix(c * _GAMMA + np.uint64(0xD1B54A32D192ED03)))


def uint64s(seed: int, purpose: int, clients: np.ndarray, server_round: int, count: int, step: int = 0) -> np.ndarray:
    """(len(clients), count) 64-bit words: entry [i, j] of client ``clients[i]``'s stream."""
    base = _bases(stream_key(seed, purpose, server_round, step), clients)
    j = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(base[:, None] + j[None, :] * _GAMMA)


def uniforms(seed: int, purpose: int, clients: np.ndarray, server_round: int, count: int, step: int = 0) -> np.ndarray:
    """(len(clients), count) draws in [0, 1) (53 bits each)."""
    words = uint64s(seed, purpose, clients, server_round, count, step)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normals(seed: int, purpose: int, clients: np.ndarray, server_round: int, count: int, step: int = 0) -> np.ndarray:
    """(len(clients), count) standard normal draws (Box-Muller on pairs of the uniform stream)."""
    pairs = (count + 1) // 2
    u = uniforms(seed, purpose, clients, server_round, 2 * pairs, step)
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 0::2]))  # 1 - u in (0, 1]: no log(0)
    angle = 2.0 * np.pi * u[:, 1::2]
    out = np.empty((u.shape[0], 2 * pairs))
    out[:, 0::2] = radius * np.cos(angle)
    out[:, 1::2] = radius * np.sin(angle)
    return out[:, :count]


def normals_torch(seed: int, purpose: int, clients, server_round: int, count: int, step: int = 0, device=None):
    """:func:`normals` computed by torch (on ``device``), float64: the same draws to float rounding."""
    import torch

    pairs = (count + 1) // 2
    u = uniforms_torch(seed, purpose, clients, server_round, 2 * pairs, step, device)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, 0::2]))
    angle = 2.0 * np.pi * u[:, 1::2]
    out = torch.empty((u.shape[0], 2 * pairs), dtype=torch.float64, device=u.device)
    out[:, 0::2] = radius * torch.cos(angle)
    out[:, 1::2] = radius * torch.sin(angle)
    return out[:, :count]


def uniforms_torch(seed: int, purpose: int, clients, server_round: int, count: int, step: int = 0, device=None):
    """:func:`uniforms` computed by torch (on ``device``): the same numbers, bit for bit.

    torch has no unsigned 64-bit multiply, but int64 multiplication wraps the
    same way modulo 2^64; right shifts are made logical with a mask.
    """
    import torch

    def signed(x: int) -> int:
        return x - (1 << 64) if x >= 1 << 63 else x

    def shr(z, s: int):
        return (z >> s) & ((1 << (64 - s)) - 1)

    def mix(z):
        z = (z ^ shr(z, 30)) * signed(0xBF58476D1CE4E5B9)
        z = (z ^ shr(z, 27)) * signed(0x94D049BB133111EB)
        return z ^ shr(z, 31)

    key = stream_key(seed, purpose, server_round, step)
    c = torch.as_tensor(np.asarray(clients, dtype=np.int64), device=device)
    base = mix(signed(key) ^ mix(c * signed(int(_GAMMA)) + signed(0xD1B54A32D192ED03)))
    j = torch.arange(1, count + 1, dtype=torch.int64, device=device)
    words = mix(base[:, None] + j[None, :] * signed(int(_GAMMA)))
    return shr(words, 11).to(torch.float64) * (1.0 / (1 << 53))
