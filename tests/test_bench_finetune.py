"""mae-fast bench --task finetune: the rows compute the same function on the same weights."""
import pytest
import torch

from conftest import tol
from mae_fast import bench_finetune as bf
from mae_fast import cli

pytest.importorskip("transformers")


def test_rows_share_weights_and_function(capsys):
    cfg = bf.FinetuneBenchConfig(model="vit_demo_patch8", img_size=32, batch_size=3, num_classes=7, warmup=1,
                                 repeats=1, variants=("torch", "auto", "auto+regional", "hf_sdpa"))
    result = bf.run(cfg)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["auto+regional"]["status"].startswith("skipped on CPU")
    losses = [rows[v]["loss"] for v in ("torch", "auto", "hf_sdpa")]
    assert all(rows[v]["status"] == "ok" for v in ("torch", "auto", "hf_sdpa"))
    for loss in losses[1:]:  # the first step's loss: the same weights, batch and labels in every row
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(losses[0]), **tol(torch.float32))
    assert rows["hf_sdpa"]["speedup_vs_hf"] == 1.0
    assert "vs HF sdpa" in bf.format_table(result)


def test_cli_task_finetune(capsys):
    assert cli.main(["bench", "--task", "finetune", "--model", "vit_demo_patch8", "--img-size", "32",
                     "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--variants", "torch,hf_sdpa"]) == 0
    assert "fine-tuning step of vit_demo_patch8" in capsys.readouterr().out
    with pytest.raises(ValueError, match="model must be one of"):
        bf.FinetuneBenchConfig(model="mae_vit_demo_patch8")
