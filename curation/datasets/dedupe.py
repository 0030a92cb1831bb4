"""Exact and near-duplicate detection for a million examples in bounded memory.

Examples arrive in priority order (the copy to keep first: an earlier
version's examples, then preferred tags, then the newest).  For each we keep
an 8-byte exact key and a MinHash signature of the text that varies between
calls of one task (never the shared system prompt).  Signatures go to a temp
file, not to memory; at the end, numpy finds:

* exact duplicates: every key after its first occurrence;
* near duplicates: LSH banding over the signatures; within each bucket every
  member is checked against the bucket's first member, and is dropped when
  their estimated Jaccard similarity reaches the threshold.

MinHash signatures come from ``rensa`` (Rust): a pure-Python MinHash is two
orders of magnitude too slow for the build budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rensa

NUM_PERM = 64
SEED = 42
_MIX = np.uint64(0x9E3779B97F4A7C15)


def bands_for(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the fewest bands that still make a pair at ``threshold`` a candidate
    with probability ``recall``; candidates are verified, so extra ones cost only time."""
    for bands in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        rows = num_perm // bands
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class SignatureWriter:
    """Collects exact keys and MinHash signatures; the signatures go straight to disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._keys: list[np.ndarray] = []
        self._eligible: list[np.ndarray] = []

    def add(self, exact_keys: list[bytes], shingle_sets: list[list[str] | None]) -> None:
        """Add a batch; ``None`` shingles mean "no varying text: exact match only"."""
        self._keys.append(np.frombuffer(b"".join(k[:8] for k in exact_keys), dtype=np.uint64))
        self._eligible.append(np.array([s is not None for s in shingle_sets], dtype=bool))
        digests = rensa.RMinHash.digests_from_token_sets(
            [s if s is not None else [""] for s in shingle_sets], num_perm=NUM_PERM, seed=SEED
        )
        self._file.write(np.asarray(digests, dtype=np.uint32).tobytes())

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(exact keys, near-dedupe eligibility) of everything added."""
        self._file.close()
        empty = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool))
        if not self._keys:
            return empty
        return np.concatenate(self._keys), np.concatenate(self._eligible)


def find_duplicates(
    keys: np.ndarray,
    eligible: np.ndarray,
    signatures_path: Path,
    threshold: float,
    *,
    protected: int = 0,
    exact_first: bool = True,
    group_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact, near, group): duplicate masks, and a group leader for every item.

    Items are in priority order; the first ``protected`` are never marked.
    With ``exact_first`` off, identical prompts are only caught as near
    duplicates.  Items whose varying text is at least ``group_threshold``
    similar (directly or through a chain) share a group leader, the earliest
    of them: a split by group keeps near-identical prompts on one side.
    """
    n = len(keys)
    exact = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    group = np.arange(n)
    if n == 0:
        return exact, near, group
    _, first = np.unique(keys, return_index=True)
    exact[:] = True
    exact[first] = False
    if exact_first:
        eligible = eligible & ~exact
    else:
        exact[:] = False
    signatures = np.memmap(signatures_path, dtype=np.uint32, mode="r", shape=(n, NUM_PERM))
    bands, rows = bands_for(threshold)
    candidates = np.flatnonzero(eligible)
    for band in range(bands):
        block = signatures[candidates, band * rows : (band + 1) * rows]
        key = np.zeros(len(candidates), dtype=np.uint64)
        for column in range(rows):
            key = key * _MIX + block[:, column].astype(np.uint64)
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        leader = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
        members = order[~starts]
        leaders = leader[~starts]
        if not len(members):
            continue
        a, b = candidates[leaders], candidates[members]
        similarity = (signatures[a] == signatures[b]).mean(axis=1)
        near[b[similarity >= threshold]] = True
        related = similarity >= min(group_threshold, threshold)
        for x, y in zip(a[related].tolist(), b[related].tolist(), strict=True):
            _union(group, x, y)
    for i in np.flatnonzero(group != np.arange(n)).tolist():
        group[i] = _find(group, i)
    near[:protected] = False
    exact[:protected] = False
    return exact, near & ~exact, group


def _find(parent: np.ndarray, item: int) -> int:
    root = item
    while parent[root] != root:
        root = int(parent[root])
    while parent[item] != root:
        parent[item], item = root, int(parent[item])
    return root


def _union(parent: np.ndarray, a: int, b: int) -> None:
    """Join two groups; the earlier item (higher priority) leads."""
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
