"""How long does a full dataset build take on a million stored calls?  Prints a table.

Uses the database `bench/store_bench.py` fills (run that first, or pass
--database-url), builds one full version with exact and near-duplicate
removal, and reports the wall time of each phase and the peak memory.

    python bench/dataset_bench.py [--rows 1000000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from distillery.curation.datasets.build import BuildOptions, build
from distillery.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    url = (
        args.database_url
        or f"sqlite:///{Path(tempfile.gettempdir()) / f'distillery-store-bench-{args.rows}.db'}"
    )
    store = open_store(url)
    rows = store.count()
    if rows < args.rows:
        sys.exit(f"{url} holds {rows:,} rows; run bench/store_bench.py --rows {args.rows} first")
    data_dir = Path(tempfile.mkdtemp(prefix="distillery-dataset-bench-"))
    try:
        started = time.perf_counter()
        result = build(store, BuildOptions(name="bench", val_fraction=0.1), data_dir)
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert result.version is not None
    manifest = result.version["manifest"]
    counts = manifest["counts"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"\nDistillery dataset build: {rows:,} stored calls, {store.engine.dialect.name}, "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"{'measure':<34}  value")
    print(f"{'-' * 34}  {'-' * 24}")
    for name, value in (
        ("wall time, full build", f"{elapsed:.1f} s"),
        ("calls considered", f"{counts['considered']:,}"),
        ("dropped", ", ".join(f"{k} {v:,}" for k, v in counts["dropped"].items())),
        ("train / validation examples", f"{counts['train']:,} / {counts['val']:,}"),
        ("throughput", f"{counts['considered'] / elapsed:,.0f} calls/s"),
        ("peak memory, parent (max RSS)", f"{peak_mb:,.0f} MB"),
        ("peak memory, one worker", f"{worker_mb:,.0f} MB"),
    ):
        print(f"{name:<34}  {value}")


if __name__ == "__main__":
    main()
