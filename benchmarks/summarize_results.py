"""The last table of benchmarks/device_check.sh: key figures of every suite that wrote JSON into
OUTDIR, and all of them merged into OUTDIR/results.json (the file to commit)."""
from __future__ import annotations

import glob
import json
import os
import sys


def _load(outdir: str) -> dict:
    suites = {}
    for path in sorted(glob.glob(os.path.join(outdir, "bench_*.json"))):
        name = os.path.basename(path)[len("bench_"):-len(".json")]
        try:
            with open(path) as f:
                suites[name] = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            suites[name] = {"error": f"unreadable: {err}"}
    return suites


def _model_lines(name: str, data: dict) -> list[str]:
    cfg, env = data["config"], data["env"]
    lines = [f"### model {name}: {cfg['model']}, batch {cfg['batch_size']}, {cfg['dtype']}, "
             f"{env.get('gpu') or 'CPU'}; matmul {data['matmul_tflops']:.3g} TFLOP/s measured",
             "", "| variant | img/s | vs torch | vs HF | MFU | mem GB |", "|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | |")
            continue

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} | {f(r['speedup_vs_torch'], '.2f')}x | "
                     f"{f(r['speedup_vs_hf'], '.2f')}x | {f(r['mfu'] and 100 * r['mfu'], '.1f')}% | "
                     f"{f(r['peak_mem_gb'], '.1f')} |")
    compiled = [f"{r['variant']} {r['compile_s']:.1f} s" for r in data["rows"] if r.get("compile_s") is not None]
    if compiled:
        lines.append(f"\ncompile / capture time: {', '.join(compiled)}")
    lines += [f"\nWARNING {w}" for w in data.get("warnings", [])]
    ablation = data.get("decoder_ablation")
    if ablation:
        lines += ["", f"decoder ablation (batch {ablation['batch_size']}): point | step ms (min-max) | "
                      "decoder share of time | of FLOPs"]
        for sweep in ("depth", "width"):
            for p in ablation[sweep]:
                lines.append(f"- {sweep} {p['decoder_depth']}x{p['decoder_width']}: {p['step_ms_median']:.1f} "
                             f"({p['step_ms_min']:.1f}-{p['step_ms_max']:.1f}) | {100 * p['decoder_time_share']:.1f}% "
                             f"| {100 * p['decoder_flops_share']:.1f}%")
    if data.get("mask_token_speedup"):
        fl = data["flops"]
        ratio = fl["with_mask_tokens"]["total_gflops"] / fl["without_mask_tokens"]["total_gflops"]
        lines.append(f"\nspeedup from dropping mask tokens: measured {data['mask_token_speedup']:.2f}x, "
                     f"FLOPs {ratio:.2f}x")
    return lines


def _generic_lines(name: str, data) -> list[str]:
    """Suites that print their own rows: show each row's identifying and ratio fields."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        return [f"### {name}", "", f"`{json.dumps(data)[:400]}`"]
    lines = [f"### {name}", ""]
    for row in rows:
        if isinstance(row, dict):
            keep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                    if not isinstance(v, (list, dict))}
            lines.append("- " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    return lines


def main(outdir: str) -> int:
    suites = _load(outdir)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(suites, f, indent=1)
    out = ["", "## device check summary", ""]
    for name, data in suites.items():
        if isinstance(data, dict) and "rows" in data and "config" in data and "matmul_tflops" in data:
            out += _model_lines(name, data)
        else:
            out += _generic_lines(name, data)
        out.append("")
    if not suites:
        out.append("(no benchmark wrote results)")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest"))
