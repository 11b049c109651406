"""Seeded permutations evaluated per position, never materialised.

- :class:`BlockedPermutation`: the tile-mode order of a large epoch (a bijection of ``[0, n)``
  with O(n / block) set-up; see its docstring).
- :func:`keyed_permutation`: a pseudo-random bijection of ``[0, size)`` per element, each with
  its own size and key (a 4-round Feistel network on the next even power of two with cycle
  walking, the standard format-preserving construction): how the sampler draws a random subset
  of a unit's tiles (its first ``k`` positions) without listing them. Set-up is nothing; an
  evaluation is ~4 rounds x (expected <= 4 walks) of integer mixing per element.
"""

from __future__ import annotations

import numpy as np

PERMUTATION_BLOCK = 4096  # items per block of the blocked permutation

_ROUNDS = 4
_MASK64 = (1 << 64) - 1
# Distinct round constants (multiples of the 64-bit golden ratio), as uint64.
_ROUND_KEYS = [np.uint64((r + 1) * 0x9E3779B97F4A7C15 & _MASK64) for r in range(_ROUNDS)]


class BlockedPermutation:
    """A seeded bijection of ``[0, n)`` evaluated per position, never materialised.

    The n items are cut into M blocks of q or q + 1 items (M = ceil(n / block)). Position
    ``j = o * M + k`` (row o, slot k) takes item ``tau_b(o)`` of block ``b = sigma(a_o * k +
    c_o mod M)``: sigma is a random order of the blocks, (a_o, c_o) a random affine map per row
    (so rows group blocks differently), tau_b a random affine order of block b. The last,
    partial row takes the (q+1)-th item of the first r = n mod M blocks. Set-up is O(M + q).
    """

    def __init__(self, n: int, rng: np.random.Generator, block: int | None = None) -> None:
        block = PERMUTATION_BLOCK if block is None else block
        self.n = n
        self.m = max(1, -(-n // block))
        self.q, self.r = divmod(n, self.m)
        self.sigma = rng.permutation(self.m)
        sizes = np.where(np.arange(self.m) < self.r, self.q + 1, self.q)
        self.block_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.block_size = sizes.astype(np.int64)
        self.tau_a = _units(sizes, rng)
        self.tau_c = rng.integers(0, 1 << 62, self.m) % self.block_size
        row_mod = np.where(np.arange(self.q + 1) < self.q, self.m, max(self.r, 1))
        self.row_a = _units(row_mod, rng)
        self.row_c = rng.integers(0, 1 << 62, self.q + 1) % row_mod

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        j = np.asarray(positions, np.int64)
        o, k = np.divmod(j, self.m)
        full = o < self.q
        slot = np.empty_like(j)
        fo, fk = o[full], k[full]
        slot[full] = self.sigma[(self.row_a[fo] * fk + self.row_c[fo]) % self.m]
        tail = j[~full] - self.m * self.q  # the last row: blocks 0..r-1, their item q
        slot[~full] = (self.row_a[self.q] * tail + self.row_c[self.q]) % max(self.r, 1)
        offset = (self.tau_a[slot] * o + self.tau_c[slot]) % self.block_size[slot]
        return self.block_start[slot] + offset


def _units(moduli: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random multiplier coprime with each modulus (an affine map mod m is then a bijection)."""
    moduli = np.asarray(moduli, np.int64)
    out = np.ones(len(moduli), np.int64)
    todo = np.flatnonzero(moduli > 1)
    while len(todo):
        draw = rng.integers(1, 1 << 62, len(todo)) % moduli[todo]
        good = np.gcd(draw, moduli[todo]) == 1
        out[todo[good]] = draw[good]
        todo = todo[~good]
    return out


def keyed_permutation(index: np.ndarray, size: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``pi(index)`` per element, ``pi`` a pseudo-random bijection of ``[0, size)`` chosen by
    ``key`` (all three broadcast; ``0 <= index < size < 2**52``). Returns int64."""
    index, size, key = np.broadcast_arrays(
        np.asarray(index, np.uint64), np.asarray(size, np.uint64), np.asarray(key, np.uint64)
    )
    index, size, key = index.ravel(), size.ravel(), key.ravel()
    bits = np.frexp(np.maximum(size, 1).astype(np.float64) - 1)[1]  # bit length of size - 1
    half = np.maximum((bits + 1) // 2, 1).astype(np.uint64)
    out = _feistel(index, half, key)
    todo = np.flatnonzero(out >= size)
    while len(todo):  # cycle walking: re-encrypt until back inside [0, size)
        out[todo] = _feistel(out[todo], half[todo], key[todo])
        todo = todo[out[todo] >= size[todo]]
    return out.astype(np.int64)


def _feistel(value: np.ndarray, half: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on ``2 * half`` bits (a bijection of ``[0, 4**half)``)."""
    mask = (np.uint64(1) << half) - np.uint64(1)
    left, right = value >> half, value & mask
    for round_key in _ROUND_KEYS:
        left, right = right, left ^ (_mix(right ^ (key + round_key)) & mask)
    return (left << half) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
