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

import tempfile
from pathlib import Path
from typing import IO

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


class Deduplicator:
    def __init__(self, threshold: float, directory: Path | None = None) -> None:
        self.threshold = threshold
        self.bands, self.rows = bands_for(threshold)
        self._file: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            dir=directory, prefix="signatures-", suffix=".u32"
        )
        self.exact: list[np.ndarray] = []
        self.eligible: list[np.ndarray] = []
        self.count = 0

    def add(self, exact_keys: list[bytes], shingle_sets: list[list[str] | None]) -> None:
        """Add a batch; ``None`` shingles mean "no varying text: exact match only"."""
        self.exact.append(np.frombuffer(b"".join(k[:8] for k in exact_keys), dtype=np.uint64))
        mask = np.array([s is not None for s in shingle_sets], dtype=bool)
        self.eligible.append(mask)
        digests = rensa.RMinHash.digests_from_token_sets(
            [s if s is not None else [""] for s in shingle_sets], num_perm=NUM_PERM, seed=SEED
        )
        self._file.write(np.asarray(digests, dtype=np.uint32).tobytes())
        self.count += len(exact_keys)

    def duplicates(
        self, protected: int = 0, group_threshold: float = 0.5, exact_first: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact, near, group): duplicate masks, and a group leader for every item.

        The first ``protected`` items are never marked.  With ``exact_first``
        off, identical prompts are only caught as near duplicates.  Items whose varying
        text is at least ``group_threshold`` similar (directly or through a
        chain) share a group leader, the earliest of them: a split by group
        keeps near-identical prompts on one side.
        """
        n = self.count
        exact = np.zeros(n, dtype=bool)
        near = np.zeros(n, dtype=bool)
        group = np.arange(n)
        if n == 0:
            return exact, near, group
        keys = np.concatenate(self.exact)
        _, first = np.unique(keys, return_index=True)
        exact[:] = True
        exact[first] = False
        self._file.flush()
        signatures = np.memmap(self._file.name, dtype=np.uint32, mode="r", shape=(n, NUM_PERM))
        eligible = np.concatenate(self.eligible)
        if exact_first:
            eligible &= ~exact
        else:
            exact[:] = False
        candidates = np.flatnonzero(eligible)
        for band in range(self.bands):
            block = signatures[candidates, band * self.rows : (band + 1) * self.rows]
            key = np.zeros(len(candidates), dtype=np.uint64)
            for column in range(self.rows):
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
            near[b[similarity >= self.threshold]] = True
            related = similarity >= min(group_threshold, self.threshold)
            for x, y in zip(a[related].tolist(), b[related].tolist(), strict=True):
                _union(group, x, y)
        for i in range(n):
            group[i] = _find(group, i)
        near[:protected] = False
        exact[:protected] = False
        return exact, near & ~exact, group

    def close(self) -> None:
        self._file.close()


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
