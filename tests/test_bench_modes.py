"""The bench's compiled and captured rows, spread warnings and the sweeps' min-max, on tiny
settings (the CUDA-graph row itself runs on a GPU: its test is GPU-marked)."""
import json

import pytest
import torch

from mae_fast import bench, cli, models_mae, report


def test_spread_and_its_warning():
    assert bench.spread(10.0, 9.0, 11.0) == pytest.approx(0.2)
    assert bench.spread_warning("auto", 10.0, 9.0, 11.0) is None  # 20% is the limit, not past it
    w = bench.spread_warning("mask ratio 0.9, auto", 10.0, 9.0, 13.2)
    assert w.startswith("mask ratio 0.9, auto: step times spread 42%") and "rerun" in w
    assert bench.spread_warning("x", 10.0, 9.0, 13.2, limit=0.5) is None
    assert bench.spread(0.0, 0.0, 0.0) == 0.0


def _cfg(**kw):
    return bench.BenchConfig(**{"model": "mae_vit_demo_patch8", "img_size": 32, "batch_size": 2, "warmup": 1,
                                "repeats": 2, **kw})


def test_rows_that_cannot_run_here_say_why():
    if torch.cuda.is_available():
        pytest.skip("on a GPU these rows run")
    res = bench.run(_cfg(variants=("auto", "auto+graphs", "auto+regional", "hf_sdpa+compile")))
    rows = {r.variant: r for r in res.rows}
    assert rows["auto+graphs"].status.startswith("needs CUDA")
    assert rows["auto+regional"].status.startswith("skipped on CPU")
    assert rows["hf_sdpa+compile"].status.startswith("skipped on CPU")
    assert rows["auto"].status == "ok" and rows["auto"].warmup_s > 0 and rows["auto"].compile_s is None
    with pytest.raises(RuntimeError, match="needs CUDA"):
        bench.CapturedStep(lambda x: x.sum(), None, (torch.zeros(1),))


def test_regional_row_reports_its_compile_time():
    # the eager compile backend traces each block (dynamo) without code generation: seconds on a CPU
    res = bench.run(_cfg(variants=("auto", "auto+regional"), compile_on_cpu=True, compile_backend="eager"))
    rows = {r.variant: r for r in res.rows}
    reg = rows["auto+regional"]
    assert reg.status == "ok", reg.status
    assert reg.compile_s is not None and 0 <= reg.compile_s <= reg.warmup_s
    assert abs(reg.loss - rows["auto"].loss) < 1e-5  # same weights, same batch, same first loss
    table = bench.format_table(res)
    assert "compile time" in table and "auto+regional" in table and "warm-up s" in table


def _result(rows, warnings=()):
    cfg = bench.BenchConfig(img_size=32, batch_size=2)
    return bench.BenchResult(config=vars(cfg) | {"variants": list(cfg.variants)},
                             env={"torch": "x", "triton": None, "commit": None, "processor": "cpu", "threads": 2},
                             matmul_tflops=1.0, flops={k: {"total_gflops": 1.0, "encoder_gflops": 0.5,
                                                           "decoder_gflops": 0.5}
                                                       for k in ("without_mask_tokens", "with_mask_tokens")},
                             rows=rows, warnings=list(warnings))


def test_table_flags_a_wide_spread():
    row = bench.Row("auto", images_per_s=100.0, step_ms_median=20.0, step_ms_min=19.0, step_ms_max=40.0,
                    spread=1.05, warmup_s=1.0)
    res = _result([row], [bench.spread_warning("auto", 20.0, 19.0, 40.0)])
    table = bench.format_table(res)
    assert "20.0 (19.0-40.0)!" in table and "WARNING auto: step times spread 105%" in table


def test_sweep_points_carry_min_max_and_warnings(tmp_path):
    pytest.importorskip("matplotlib")
    point = {"images_per_s": 10.0, "step_ms_median": 200.0, "step_ms_min": 100.0, "step_ms_max": 400.0, "spread": 1.5}
    mask_sweep = [{"mask_ratio": 0.75, "images_per_s": 10.0, "images_per_s_with_mask_tokens": 5.0, "speedup": 2.0,
                   "flops_ratio": 2.5, "rows": {"auto": point, "encoder_mask_tokens": point},
                   "warnings": ["mask ratio 0.75, auto: step times spread 150% ..."]}]
    batch_sweep = [{"batch_size": 2, "torch": 10.0, "rows": {"torch": point}, "warnings": []}]
    ablation = {"model": "m", "batch_size": 2, "mask_ratio": 0.75, "base_depth": 2, "base_width": 8,
                "depth": [{"decoder_depth": 2, "decoder_width": 8, "step_ms_median": 1.0, "step_ms_min": 1.0,
                           "step_ms_max": 1.1, "images_per_s": 2000.0, "decoder_time_share": 0.3,
                           "decoder_flops_share": 0.25, "decoder_per_token_flops": 0.09, "warning": None}],
                "warnings": []}
    ablation["width"] = ablation["depth"]
    paths = report.write_report(str(tmp_path), _result([]), mask_sweep=mask_sweep, batch_sweep=batch_sweep,
                                ablation=ablation)
    md = (tmp_path / "report.md").read_text()
    assert "| 0.75 | 10.0 (5.0-20.0) ! |" in md  # img/s median (min-max), flagged
    assert "| 2 | 10.0 (5.0-20.0) ! |" in md
    assert "## Warnings: 1 measurement(s)" in md and "- mask ratio 0.75, auto" in md
    assert "Decoder design in wall-clock" in md and "Kernel profile: needs CUDA" in md
    assert any(p.endswith("decoder_ablation.png") for p in paths)


def test_bench_ablate_decoder_cli(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--model", "mae_vit_demo_patch8", "--img-size", "32",
                     "--batch-size", "1", "--warmup", "0", "--repeats", "1", "--variants", "auto", "--ablate-decoder",
                     "--decoder-depths", "1", "--decoder-widths", "32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decoder ablation (mae_vit_demo_patch8" in text
    data = json.loads(out.read_text())["decoder_ablation"]
    assert [p["decoder_depth"] for p in data["depth"]] == [1] and [p["decoder_width"] for p in data["width"]] == [32]
    assert cli.main(["bench", "--device", "cpu", "--variants", "auto", "--ablate-decoder",
                     "--decoder-widths", "6x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.gpu
def test_captured_step_replays_the_eager_steps():
    """Same init, same batch and noise: replaying the captured step gives the eager steps' losses;
    without noise, each replay draws a new mask (the graph-safe RNG)."""
    def make():
        torch.manual_seed(0)
        m = models_mae.create_model("mae_vit_tiny_patch16", img_size=64, backend="auto").cuda()
        return m, bench.make_optimizer(m.parameters(), capturable=True)

    imgs = torch.randn(4, 3, 64, 64, device="cuda")
    noise = torch.rand(4, 16, device="cuda")
    model, opt = make()
    eager = []
    for _ in range(6):
        loss = model(imgs, noise=noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        eager.append(loss.item())
    model, opt = make()
    step = bench.CapturedStep(lambda x, n: model(x, noise=n)[0], opt, (imgs, noise), warmup=3)
    graphed = [t.item() for t in step.losses[:3]] + [step(imgs, noise).item() for _ in range(3)]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4, atol=1e-5)

    with torch.no_grad():  # the model's own masking, captured: each replay draws a new mask
        graph, mask = bench.capture_graph(lambda: model.masking_ids(4, 16, 0.75, imgs.device)[2], warmup=1)
        masks = []
        for _ in range(2):
            graph.replay()
            masks.append(mask.clone())
    assert not torch.equal(masks[0], masks[1]) and masks[0].sum() == masks[1].sum() == 4 * 12


@pytest.mark.gpu
def test_graphs_row_runs_on_cuda():
    res = bench.run(bench.BenchConfig(img_size=64, batch_size=4, warmup=1, repeats=2, device="cuda",
                                      variants=("auto", "auto+graphs")))
    rows = {r.variant: r for r in res.rows}
    assert rows["auto+graphs"].status == "ok", rows["auto+graphs"].status
    assert abs(rows["auto+graphs"].loss - rows["auto"].loss) < 1e-4 and rows["auto+graphs"].compile_s > 0
