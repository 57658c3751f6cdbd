"""benchmarks/gpu.sh: the prepared GPU run works end to end as a dry run (tiny preset, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402


def test_every_gpu_row_of_the_performance_page_is_in_the_script() -> None:
    assert [row.name for row in gpu.ROWS] == ["train", "train_lora", "image", "batch_n4", "stages"]
    for row in gpu.ROWS:
        assert "--device" in row.gpu_args and "cuda" in row.gpu_args
        assert (ROOT / "benchmarks" / row.script).is_file()
    assert sum(row.limit_s for row in gpu.ROWS) <= 8 * 60 + 300  # each row capped; the budget caps the sum


def test_the_dry_run_writes_one_json_and_one_markdown_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu.sh"),
            "--dry-run",
            "--rows",
            "train,stages",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] is True
    assert set(report["rows"]) == {"train", "stages"}
    assert all(row["status"] == "ok" for row in report["rows"].values()), report["rows"]
    stages = report["rows"]["stages"]["result"]["stages"]
    assert stages["train"]["plain_s"] > 0  # the plain PyTorch loop runs beside stencil's training
    table = (tmp_path / "gpu.md").read_text()
    assert "| mask pass |" in table and "## train:" in table


def test_the_gpu_run_refuses_a_machine_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
