"""The command line and the benchmark harness, on tiny settings."""
import json

import pytest
import torch

from mae_fast import bench, cli


def test_flops_json_reproduces_the_paper(capsys):
    assert cli.main(["flops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    vit_l = report["mae_vit_large_patch16"]
    assert round(vit_l["without_mask_tokens"]["total_gflops"], 1) == 41.5
    assert round(vit_l["with_mask_tokens"]["total_gflops"], 1) == 134.0
    assert set(report) == {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"}
    for r in report.values():
        for v in ("without_mask_tokens", "with_mask_tokens"):
            s = r[v]
            assert abs(s["encoder_gflops"] + s["decoder_gflops"] - s["total_gflops"]) < 1e-9


def test_flops_table(capsys):
    assert cli.main(["flops", "--models", "mae_vit_large_patch16"]) == 0
    out = capsys.readouterr().out
    assert "3.23x fewer FLOPs" in out and "8.8%" in out


def test_bench_rows_side_by_side(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    code = cli.main(["bench", "--device", "cpu", "--img-size", "64", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                     "--variants", "torch,auto,auto+compile,encoder_mask_tokens", "--json", str(out_json)])
    assert code == 0
    table = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["images_per_s"] > 0
    assert rows["torch"]["speedup_vs_torch"] == 1.0
    assert rows["auto+compile"]["status"].startswith("skipped on CPU")  # stays in the table, with why
    assert "auto+compile" in table and "dropping mask tokens" in table
    # every row trained on the same weights and batch: the first losses agree (the ablation differs)
    assert abs(rows["auto"]["loss"] - rows["torch"]["loss"]) < 1e-5
    assert result["mask_token_speedup"] > 0 and result["env"]["torch"] == torch.__version__


@pytest.mark.parametrize("kwargs, words", [
    ({"model": "vit_giant"}, "model must be one of"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"variants": ("torch", "jax")}, "variants must be among"),
    ({"dtype": "bf16", "device": "cpu"}, "autocast"),
])
def test_bench_config_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        bench.BenchConfig(**kwargs)


def test_cli_reports_bad_arguments(capsys):
    assert cli.main(["bench", "--device", "cpu", "--dtype", "bf16"]) == 2
    assert "error" in capsys.readouterr().err


def test_profile_stages_cover_the_step():
    from mae_fast import profile
    from test_model import tiny_model

    model = tiny_model(backend="torch")
    rows = profile.profile(model, torch.randn(2, 3, 32, 32), warmup=0, repeats=1)
    assert [r.stage for r in rows] == list(profile.STAGES)
    assert abs(sum(r.time_share for r in rows) - 1) < 1e-9
    assert abs(sum(r.flops_share for r in rows) - 1) < 1e-9
    by = {r.stage: r for r in rows}
    for stage in ("patch_embed", "encoder_blocks", "decoder_blocks", "head", "loss"):
        assert by[stage].forward_ms > 0 and by[stage].backward_ms > 0, stage
    assert model.cls_token.grad is None  # gradients were cleared after each profiled step


def test_profile_cli(capsys, tmp_path):
    trace = tmp_path / "t.json"
    assert cli.main(["profile", "--device", "cpu", "--img-size", "64", "--batch-size", "1", "--warmup", "0", "--repeats", "1",
                     "--backend", "torch", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "encoder_blocks" in out and "% of FLOPs" in out
    assert json.loads(trace.read_text())["traceEvents"]


def test_bench_report_writes_markdown_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    assert cli.main(["bench", "--device", "cpu", "--img-size", "64", "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--variants", "torch",
                     "--report", str(out), "--mask-ratios", "0.75", "--batch-sizes", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["report.md", "result.json", "speedup_vs_mask_ratio.png", "stage_breakdown.png",
                     "throughput_vs_batch.png"]
    data = json.loads((out / "result.json").read_text())
    assert data["mask_ratio_sweep"][0]["flops_ratio"] > 1 and len(data["stages"]) == 7
    md = (out / "report.md").read_text()
    assert "Where the time goes" in md and "![stage_breakdown.png]" in md
