"""How much the validation MSE of a trained CIFAR-10 run depends on which 2,000 validation images are used:
the first 2,000 (before issue 11 item 15), the fixed random subset used now, and all 10,000.

    python scripts/evaluation_subset_shift.py RUN_DIR [RUN_DIR ...]
"""
import sys

import torch

from kohonen_vae.data import evaluation_subset, splits_from_config
from kohonen_vae.report import load_run
from kohonen_vae.training.loop import evaluate


def main(run_dirs) -> None:
    splits = None
    cpu = torch.device("cpu")
    for d in run_dirs:
        run = load_run(d, "best", device="cpu")
        if splits is None:
            splits = splits_from_config(run.config["data"])
        v = splits.val.images
        first = evaluate(run.model, v[:2000], run.normalizer, 500, cpu)["recon"]
        rand = evaluate(run.model, evaluation_subset(v, 2000, run.config["data"]["split_seed"]), run.normalizer,
                        500, cpu)["recon"]
        full = evaluate(run.model, v, run.normalizer, 500, cpu)["recon"]
        print(f"{d}: first 2000 {first * 1000:.2f}, random 2000 {rand * 1000:.2f}, all {len(v)} {full * 1000:.2f} "
              f"(x10^-3); random vs first {(rand - first) / first * 100:+.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
