"""Markdown report and PNG plots of a benchmark run (plots need matplotlib: the ``bench`` extra)."""
from __future__ import annotations

import json
import os

from .bench import BenchResult, format_table
from .profile import StageRow


def write_report(out_dir: str, result: BenchResult, *, stages: list[StageRow] | None = None,
                 mask_sweep: list[dict] | None = None, batch_sweep: list[dict] | None = None) -> list[str]:
    """Write ``result.json``, ``report.md`` and the plots into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = {**result.to_dict(), "stages": [vars(s) for s in stages or []],
            "mask_ratio_sweep": mask_sweep or [], "batch_size_sweep": batch_sweep or []}
    paths = [os.path.join(out_dir, "result.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=2)
    plots, why_no_plots = _plots(out_dir, stages, mask_sweep, batch_sweep)
    with open(paths[1], "w") as f:
        f.write(_markdown(result, stages, mask_sweep, batch_sweep, plots, why_no_plots))
    return paths + plots


def _markdown(result, stages, mask_sweep, batch_sweep, plots, why_no_plots) -> str:
    md = ["# mae-fast bench", "", "```", format_table(result), "```", ""]
    if stages:
        md += ["## Where the time goes (backend auto)", "",
               "| stage | forward ms | backward ms | time | FLOPs |", "|---|---:|---:|---:|---:|"]
        md += [f"| {s.stage} | {s.forward_ms:.2f} | {s.backward_ms:.2f} | {100 * s.time_share:.1f}% | "
               f"{100 * s.flops_share:.1f}% |" for s in stages]
        md.append("")
    if mask_sweep:
        md += ["## Dropping mask tokens, per mask ratio", "",
               "| mask ratio | img/s | img/s with mask tokens | measured speedup | FLOPs ratio |",
               "|---:|---:|---:|---:|---:|"]
        md += [f"| {r['mask_ratio']} | {r['images_per_s']:.1f} | {r['images_per_s_with_mask_tokens']:.1f} | "
               f"{r['speedup']:.2f}x | {r['flops_ratio']:.2f}x |" for r in mask_sweep]
        md.append("")
    if batch_sweep:
        cols = [k for k in batch_sweep[0] if k != "batch_size"]
        md += ["## Throughput per batch size (img/s)", "", "| batch | " + " | ".join(cols) + " |",
               "|---:|" + "---:|" * len(cols)]
        md += ["| " + " | ".join([str(r["batch_size"])] + [f"{r[c]:.1f}" if r[c] else "-" for c in cols]) + " |"
               for r in batch_sweep]
        md.append("")
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    if why_no_plots:
        md.append(f"(no plots: {why_no_plots})")
    return "\n".join(md) + "\n"


def _plots(out_dir, stages, mask_sweep, batch_sweep) -> tuple[list[str], str | None]:
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
        for col in (k for k in batch_sweep[0] if k != "batch_size"):
            ax.plot([r["batch_size"] for r in batch_sweep], [r[col] for r in batch_sweep], "o-", label=col)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "throughput_vs_batch.png")
    return paths, None
