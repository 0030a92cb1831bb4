"""bench/distill_tasks.py on its smallest setting: one task, few calls, few epochs.

It proves the benchmark runs end to end (teacher server, proxy, openai SDK, dataset
build, student create, the reference loop, `distillery distill` with its defaults,
held-out scoring) and that its table holds numbers that make sense.  The full run,
whose numbers are in the README, is `python bench/distill_tasks.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "trl", reason="the training extra is not installed: pip install torch==2.13.0 -e '.[train]'"
)
# CI runs these again once the extra is installed (`pytest -m train`).
pytestmark = pytest.mark.train

BENCH = Path(__file__).parent.parent / "bench" / "distill_tasks.py"


@pytest.mark.example
def test_the_distillation_benchmark_runs_on_its_smallest_setting(tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    result = subprocess.run(
        [
            *(sys.executable, str(BENCH), "--tasks", "dates", "--calls", "200"),
            *("--heldout", "30", "--ref-epochs", "6", "--workdir", str(tmp_path / "work")),
            *("--seeds", "2", "--json", str(rows)),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "held-out exact match" in result.stdout and "dates" in result.stdout
    [row] = json.loads(rows.read_text())
    assert row["teacher"] == 1.0  # the deterministic teacher, through the real client
    assert row["untrained"] == 0.0  # a random student answers nothing right
    assert row["train"] + row["val"] <= 200 and row["val"] > 0
    assert row["product"] > row["untrained"]  # the defaults learn something even here
    assert row["product_train_s"] > 0
    # Two training seeds a side, the second product run a `finetune create --seed 1`; the
    # task's numbers are their means.
    assert [run["seed"] for run in row["runs"]] == [0, 1]
    assert [run["product_seed"] for run in row["runs"]] == [0, 1]  # its own job each time
    assert row["runs"][0]["product_train_s"] <= row["distill_s"] == row["runs"][0]["product_s"]
    for key in ("reference", "product", "reference_s", "product_train_s"):
        assert row[key] == pytest.approx(sum(run[key] for run in row["runs"]) / 2)
