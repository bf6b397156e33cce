"""Markdown report and PNG plots of a benchmark run (plots need matplotlib: the ``bench`` extra)."""
from __future__ import annotations

import json
import os

from .bench import SPREAD_LIMIT, BenchResult, _fmt, format_table, sweep_warnings
from .profile import StageRow, format_ablation, format_kernel_profile


def write_report(out_dir: str, result: BenchResult, *, stages: list[StageRow] | None = None,
                 mask_sweep: list[dict] | None = None, batch_sweep: list[dict] | None = None,
                 kernels: dict | None = None, ablation: dict | None = None) -> list[str]:
    """Write ``result.json``, ``report.md`` and the plots into ``out_dir``; returns the paths.
    ``kernels``: a :func:`profile.kernel_profile` (CUDA runs); ``ablation``: a
    :func:`profile.decoder_ablation` (``--ablate-decoder``)."""
    os.makedirs(out_dir, exist_ok=True)
    data = {**result.to_dict(), "stages": [vars(s) for s in stages or []],
            "mask_ratio_sweep": mask_sweep or [], "batch_size_sweep": batch_sweep or [],
            "kernels": kernels, "decoder_ablation": ablation}
    paths = [os.path.join(out_dir, "result.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=2)
    plots, why_no_plots = _plots(out_dir, stages, mask_sweep, batch_sweep, ablation)
    with open(paths[1], "w") as f:
        f.write(_markdown(result, stages, mask_sweep, batch_sweep, kernels, ablation, plots, why_no_plots))
    return paths + plots


def _img_s_range(row: dict | None, batch: int) -> str:
    """``median (min-max)`` img/s of a sweep point's row, ``!`` past the spread limit."""
    if not row:
        return "-"
    lo, hi = batch / row["step_ms_max"] * 1e3, batch / row["step_ms_min"] * 1e3
    flag = " !" if row["spread"] is not None and row["spread"] > SPREAD_LIMIT else ""
    return f"{row['images_per_s']:.1f} ({lo:.1f}-{hi:.1f}){flag}"


def _markdown(result, stages, mask_sweep, batch_sweep, kernels, ablation, plots, why_no_plots) -> str:
    batch = result.config["batch_size"]
    md = ["# mae-fast bench", "", "```", format_table(result), "```", ""]
    warnings = result.warnings + sweep_warnings(mask_sweep, batch_sweep) + ((ablation or {}).get("warnings") or [])
    if warnings:
        md += [f"## Warnings: {len(warnings)} measurement(s) spread more than {100 * SPREAD_LIMIT:.0f}%", "",
               "Rerun these before quoting them (marked `!` in the tables):", ""]
        md += [f"- {w}" for w in warnings]
        md.append("")
    if stages:
        md += ["## Where the time goes (backend auto)", "",
               "| stage | forward ms | backward ms | time | FLOPs |", "|---|---:|---:|---:|---:|"]
        md += [f"| {s.stage} | {s.forward_ms:.2f} | {s.backward_ms:.2f} | {100 * s.time_share:.1f}% | "
               f"{100 * s.flops_share:.1f}% |" for s in stages]
        md.append("")
    if mask_sweep:
        md += ["## Dropping mask tokens, per mask ratio", "",
               "img/s: median (min-max) over the point's steps.", "",
               "| mask ratio | img/s | img/s with mask tokens | measured speedup | FLOPs ratio |",
               "|---:|---:|---:|---:|---:|"]
        md += [f"| {r['mask_ratio']} | {_img_s_range(r['rows'].get('auto'), batch)} | "
               f"{_img_s_range(r['rows'].get('encoder_mask_tokens'), batch)} | "
               f"{_fmt(r['speedup'], '.2f')}x | {r['flops_ratio']:.2f}x |" for r in mask_sweep]
        md.append("")
    if batch_sweep:
        cols = list(batch_sweep[0]["rows"])
        md += ["## Throughput per batch size", "", "img/s: median (min-max) over the point's steps.", "",
               "| batch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        md += ["| " + " | ".join([str(r["batch_size"])] + [_img_s_range(r["rows"].get(c), r["batch_size"])
                                                            for c in cols]) + " |" for r in batch_sweep]
        md.append("")
    if kernels:
        md += ["## Where the GPU time goes, per kernel kind (backend auto)", "",
               "One step's kernels (torch.profiler), attributed to the encoder or the decoder by the range that "
               "launched them, grouped by kind, each beside its floor (matmul FLOPs over the measured matmul rate, "
               "or the bytes a kind must move over the measured copy bandwidth; see `mae_fast.profile.kind_bytes`).",
               "", "```", format_kernel_profile(kernels, "mae-fast profile --kernels"), "```", ""]
    else:
        md += ["(Kernel profile: needs CUDA; `mae-fast profile --kernels` on a GPU.)", ""]
    if ablation:
        md += ["## Decoder design in wall-clock (the paper's Table 1a, 1b)", "",
               "Each point a fresh model with the same encoder: step time (forward, backward, AdamW), median "
               "(min-max); the decoder's share of the forward + backward time beside its share of the FLOPs; "
               "decoder FLOPs per token over the encoder's.", "", "```", format_ablation(ablation), "```", ""]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    if why_no_plots:
        md.append(f"(no plots: {why_no_plots})")
    return "\n".join(md) + "\n"


def _plots(out_dir, stages, mask_sweep, batch_sweep, ablation=None) -> tuple[list[str], str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install mae_fast[bench])"
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    if mask_sweep:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        x = [r["mask_ratio"] for r in mask_sweep]
        ax.plot(x, [r["speedup"] for r in mask_sweep], "o-", label="measured wall-clock")
        ax.plot(x, [r["flops_ratio"] for r in mask_sweep], "s--", label="FLOPs ratio (bound)")
        ax.set_xlabel("mask ratio")
        ax.set_ylabel("speedup from dropping mask tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "speedup_vs_mask_ratio.png")
    if stages:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        names = [s.stage for s in stages]
        ax.barh(names, [s.forward_ms for s in stages], label="forward")
        ax.barh(names, [s.backward_ms for s in stages], left=[s.forward_ms for s in stages], label="backward")
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median)")
        ax.legend()
        save(fig, "stage_breakdown.png")
    if batch_sweep:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for col in batch_sweep[0]["rows"]:
            ax.plot([r["batch_size"] for r in batch_sweep], [r[col] for r in batch_sweep], "o-", label=col)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "throughput_vs_batch.png")
    if ablation:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, sweep, key in zip(axes, ("depth", "width"), ("decoder_depth", "decoder_width")):
            x = [p[key] for p in ablation[sweep]]
            ax.plot(x, [100 * p["decoder_time_share"] for p in ablation[sweep]], "o-", label="share of time")
            ax.plot(x, [100 * p["decoder_flops_share"] for p in ablation[sweep]], "s--", label="share of FLOPs")
            ax.set_xlabel(f"decoder {sweep}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("decoder, % of fwd + bwd")
        axes[0].legend()
        save(fig, "decoder_ablation.png")
    return paths, None
