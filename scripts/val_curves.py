"""Validation MSE against training step for finished runs, one line per run (from each summary.json's evals).

    python scripts/val_curves.py RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...] [--scale 1000]

The reproduce curves plot the training loss (MSE + commitment), which is not comparable across quantisers
whose loss has no commitment term (FSQ); this plots the validation reconstruction MSE alone, on a log axis,
with the first 20 % of the steps in the left panel and the rest, zoomed, in the right one.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kohonen_vae.figures import save_figure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", nargs="*", default=None, help="one per run (default: the run folder's parent name)")
    ap.add_argument("--scale", type=float, default=1000.0, help="multiply MSE by this (default 1000: x10^-3)")
    args = ap.parse_args()
    labels = args.labels or [Path(r).resolve().parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    evals = [json.loads((Path(run) / "summary.json").read_text())["evals"] for run in args.runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    for run_evals, label in zip(evals, labels):
        steps = [s for s, _ in run_evals]
        mse = [v * args.scale for _, v in run_evals]
        for ax in axes:
            ax.plot(steps, mse, marker=".", label=label)
    last = max(s for run_evals in evals for s, _ in run_evals)
    axes[0].set_xlim(0, last * 0.2)
    axes[1].set_xlim(last * 0.2, last)
    lo = min(v * args.scale for run_evals in evals for _, v in run_evals)
    axes[1].set_ylim(lo * 0.97, lo * 1.25)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"validation MSE x10^-{len(str(int(args.scale))) - 1}")
    axes[0].set_title("first 20 % of the steps")
    axes[1].set_title("the rest (zoomed)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
