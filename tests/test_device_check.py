"""The GPU device script also runs on a CPU machine, GPU parts skipped, so CI keeps it working."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is run for real, not from pytest")
def test_device_check_runs_on_cpu(tmp_path):
    env = {**os.environ, "PY": sys.executable, "DEVICE_CHECK_SKIP_TESTS": "1", "DEVICE_CHECK_SKIP_BUILD": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "no nvidia-smi: CPU machine" in out
    assert "memcheck         skipped" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model_tiny"]["rows"][0]["status"] == "ok"
    finetune = {r["variant"]: r["status"] for r in results["finetune_tiny"]["rows"]}
    assert finetune["torch"] == finetune["auto"] == "ok"
    assert "device check summary" in (tmp_path / "summary.md").read_text()
    # what comes back from the GPU machine: at most 8 files, every suite inside the archive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.log", "results.json", "suites.tar.gz",
                                                          "summary.md"]
    import tarfile

    with tarfile.open(tmp_path / "suites.tar.gz") as tar:
        assert "./bench_model_tiny.json" in tar.getnames()
