"""Reproduce the paper's experiments: ``kohonen-vae reproduce EXPERIMENT [--scale cpu|paper] [--seeds N]``.

An experiment is plain data: a base config, a list of variants (each a quantiser table and/or config
overrides) and a number of seeds. :func:`reproduce` trains every variant x seed into
``OUT/EXPERIMENT/<variant>/seed<k>`` (finished runs are skipped, interrupted ones resumed), then writes

* ``results.md``: the paper's table layout (best validation MSE x10^3 mean +- std over seeds, +10% and +20%
  convergence steps, final perplexity and used codes), with the exact command;
* ``curves.png`` (seeds as a mean line with a min-max band) and, for the ``figures`` experiment, the
  paper's figures (codebook mosaics, index offset, N0 training loss, neighbourhood heat-maps);
* ``report.html``: the aggregate table and figures, then the run report of the first seed of every
  variant (:mod:`kohonen_vae.report`).

Scales: ``paper`` is the paper's protocol (spec section 6), for GPUs. ``cpu`` is a reduced protocol in
which each experiment takes about an hour or less on 2 CPU cores (see :data:`CPU_SCALE` and
docs/results.md for how it differs). ``long`` is the CPU protocol at length (:data:`LONG_SCALE`: 20,000
steps of batch 64, validation on the whole validation split every 500 steps, the whole test split at the
end), defined for the experiments in :data:`LONG_STEPS`. ``tiny`` is a seconds-long smoke scale for tests.

Runs of the ``cpu`` scale go to ``OUT/EXPERIMENT``, those of other scales to ``OUT/EXPERIMENT-SCALE``.
"""
from __future__ import annotations

import argparse
import base64
import copy
import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------------------- experiments
EMA = {"type": "ema"}
HARD = {"type": "ksom", "neighborhood": "hard"}
GAUSS = {"type": "ksom", "neighborhood": "exponential"}  # the paper's "Gaussian" (reference implementation)


@dataclass
class Variant:
    """One configuration of an experiment: ``quantizer`` is the full quantiser table (replacing the
    base's), ``overrides`` a nested dict merged into the config (e.g. ``{"train": {"lr": 3e-4}}``)."""

    label: str
    quantizer: dict
    overrides: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        out = "".join(c if c.isalnum() or c in "-." else "-" for c in self.label.lower())
        while "--" in out:
            out = out.replace("--", "-")
        return out.strip("-")


@dataclass
class Experiment:
    """One experiment: its grid of variants on a base config, and its length at each scale."""

    name: str
    description: str
    base: str                      # bundled config name
    variants: list
    seeds: dict                    # scale -> default number of seeds
    cpu_steps: int                 # training steps at the cpu scale
    loss_scale: int = 1000         # the table reports best validation MSE x loss_scale (x10^4 for faces)
    dataset_kind: str = "cifar"    # which CPU-scale settings apply
    cpu_overrides: dict = field(default_factory=dict)  # merged into every config at the cpu scale
    long_steps: int | None = None  # training steps at the long scale (None: not defined at that scale)
    long_variants: tuple | None = None  # labels of the variants trained at the long scale (None: all)
    organisation: bool = False     # the table gets topographic error, map smoothness, index-perturbation
                                   # robustness (every seed's final model) and interleaved ms per step


def _robustness_variants():
    out = []
    for update_unused, mode in ((True, "original"), (False, "no-update")):
        for q, name in ((EMA, "EMA-VQ"), (HARD, "KSOM hard"), (GAUSS, "KSOM Gaussian")):
            for n0 in (0.0, 1.0):
                out.append(Variant(f"{mode} {name} N0={n0:g}", {**q, "count_init": n0, "update_unused": update_unused}))
    return out


#: the collapse fixes practitioners use today (landscape.md), natively and through vector-quantize-pytorch; each
#: baseline with the settings its own users give it (VectorQuantize's defaults: rotation trick on in 1.32,
#: decay 0.8, commitment weight 1, kaiming-uniform init; dead-code threshold 2 as in its README)
FIELD_VARIANTS = [
    Variant("EMA-VQ", EMA),
    Variant("EMA-VQ + uniform init", {**EMA, "codebook_init": "uniform"}),
    Variant("EMA-VQ + k-means init", {**EMA, "kmeans_init": True, "kmeans_iters": 10}),
    Variant("EMA-VQ + restarts", {**EMA, "threshold_ema_dead_code": 2}),
    Variant("KSOM hard", HARD),
    Variant("KSOM hard + restarts", {**HARD, "threshold_ema_dead_code": 2}),
    Variant("KSOM hard + k-means init", {**HARD, "kmeans_init": True, "kmeans_iters": 10}),
    Variant("KSOM Gaussian", GAUSS),
    Variant("VectorQuantize (defaults)", {"type": "vqp", "cls": "VectorQuantize"}),
    Variant("VectorQuantize straight-through", {"type": "vqp", "cls": "VectorQuantize",
                                                "options": {"rotation_trick": False}}),
    Variant("FSQ 8x8x8", {"type": "vqp", "cls": "FSQ", "options": {"levels": [8, 8, 8]}}),
    Variant("SimVQ", {"type": "vqp", "cls": "SimVQ"}),
]

EXPERIMENTS = {
    "main": Experiment(
        "main", "EMA-VQ vs KSOM-hard vs KSOM-Gaussian (2-D grid, N0 = 1) on CIFAR-10: final loss and convergence "
        "speed (the paper's main table, CIFAR-10 column).", "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD), Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 5, "cpu": 3, "long": 1, "tiny": 1}, cpu_steps=1000, long_steps=20000),
    "robustness": Experiment(
        "robustness", "{original, no-update} x {EMA-VQ, KSOM hard, KSOM Gaussian} x N0 in {0, 1} on CIFAR-10: "
        "EMA-VQ with N0 = 0 loses codes; KSOM is robust to it.", "cifar10-ksom-hard", _robustness_variants(),
        seeds={"paper": 5, "cpu": 3, "tiny": 1}, cpu_steps=300, cpu_overrides={"data": {"val_max_images": 1000}}),
    "ablation": Experiment(
        "ablation", "Neighbourhood ablation on CIFAR-10: none; hard 1-D; hard 2-D with tau in {1, 0.1, 0.01}; "
        "Gaussian 1-D; Gaussian 2-D with tau in {1, 0.1, 0.01}.", "cifar10-ksom-hard",
        [Variant("none (EMA-VQ)", EMA), Variant("hard 1-D tau=0.1", {**HARD, "grid_dims": 1, "shrink": 0.1})]
        + [Variant(f"hard 2-D tau={tau:g}", {**HARD, "shrink": tau}) for tau in (1.0, 0.1, 0.01)]
        + [Variant("Gaussian 1-D tau=0.1", {**GAUSS, "grid_dims": 1, "shrink": 0.1})]
        + [Variant(f"Gaussian 2-D tau={tau:g}", {**GAUSS, "shrink": tau}) for tau in (1.0, 0.1, 0.01)],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}, cpu_steps=600),
    "gradient-som": Experiment(
        "gradient-som", "Gradient-descent SOM (neighbours pulled towards the detached winner, as the authors; and "
        "towards the input, SOM-VAE) vs EMA-VQ vs KSOM-hard vs the original gradient VQ on CIFAR-10.",
        "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD),
         Variant("GD-SOM hard (winner)", {"type": "gdsom", "neighborhood": "hard", "target": "winner"}),
         Variant("GD-SOM hard (input)", {"type": "gdsom", "neighborhood": "hard", "target": "input"}),
         Variant("VQ (gradient)", {"type": "gradient"})],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}, cpu_steps=800),
    "sensitivity": Experiment(
        "sensitivity", "Hyper-parameter sensitivity of KSOM-hard (2-D) on CIFAR-10: codebook size K, commitment "
        "weight beta, and 1 - gamma.", "cifar10-ksom-hard",
        # each axis varies one setting around the default (K = 512, beta = 0.25, 1 - gamma = 0.01), which
        # is trained once and shared by the three axes
        [Variant(f"K={k}", {**HARD, "codebook_size": k}) for k in (128, 256)]
        + [Variant("default: K=512, beta=0.25, 1-gamma=0.01", {**HARD, "codebook_size": 512})]
        + [Variant(f"K={k}", {**HARD, "codebook_size": k}) for k in (1024,)]
        + [Variant(f"beta={b:g}", {**HARD, "commitment_weight": b}) for b in (0.0, 0.1, 0.5, 1.0)]
        + [Variant(f"1-gamma={g:g}", {**HARD, "decay": round(1 - g, 6)}) for g in (0.001, 0.03, 0.1, 0.5)],
        seeds={"paper": 3, "cpu": 1, "tiny": 1}, cpu_steps=500),
    "faces": Experiment(
        "faces", "VQ-VAE-2 on faces (UTKFace 64x64, the stand-in for the paper's CelebA-HQ + AFHQ mixture): "
        "EMA-VQ vs KSOM-hard vs KSOM-Gaussian; loss reported x10^4 as in the paper.", "faces-vqvae2",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD), Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}, cpu_steps=600, loss_scale=10_000, dataset_kind="faces"),
    "figures": Experiment(
        "figures", "The paper's figures on CIFAR-10: codebook mosaics (EMA-VQ vs KSOM), index offset, perplexity "
        "over training, the N0 = 0 vs N0 = 1 training loss of EMA-VQ, and neighbourhood heat-maps.",
        "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("EMA-VQ N0=0", {**EMA, "count_init": 0.0}), Variant("KSOM hard", HARD),
         Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 1, "cpu": 1, "tiny": 1}, cpu_steps=1000),
    "field": Experiment(
        "field", "KSOM against the collapse fixes practitioners use today on CIFAR-10: EMA-VQ with the paper's "
        "N(0, I) init, a uniform init, k-means init and dead-code restarts; KSOM hard alone and with restarts or "
        "k-means; KSOM Gaussian; vector-quantize-pytorch's VectorQuantize (its defaults, and straight-through), "
        "FSQ (8, 8, 8) and SimVQ, all with K = 512.", "cifar10-ksom-hard", FIELD_VARIANTS,
        seeds={"paper": 3, "cpu": 3, "long": 1, "tiny": 1}, cpu_steps=1000, long_steps=20000,
        # at length: the main configurations and the two strongest baselines at 1,000 steps (cpu scale, 3 seeds:
        # EMA-VQ + restarts 69.6, FSQ 73.7 x10^-3; VectorQuantize's defaults 74.1 were within one std of FSQ)
        long_variants=("EMA-VQ", "KSOM hard", "KSOM Gaussian", "EMA-VQ + restarts", "FSQ 8x8x8"), organisation=True),
}

# ------------------------------------------------------------------------------------------------ scales
#: The reduced CPU protocol (per dataset kind and experiment). Differences from the paper: batch 64 (not
#: 256) or 32 for VQ-VAE-2, hundreds instead of 30,000 steps, validation every 50 steps on the first 2,000
#: (1,000 for robustness) images of the same 20% validation split instead of every 1,000 steps on all of it.
CPU_SCALE = {
    "cifar": {"data": {"val_max_images": 2000, "test_max_images": 2000},
              "train": {"batch_size": 64, "eval_every": 50, "checkpoint_every": 100, "log_every": 10,
                        "eval_batch_size": 500, "progress": True}},
    "faces": {"data": {"val_max_images": 640, "test_max_images": 640},
              "train": {"batch_size": 32, "eval_every": 50, "checkpoint_every": 100, "log_every": 10,
                        "eval_batch_size": 128, "progress": True}},
}

#: The long CPU protocol (issue "the paper's central claim at length"): the CPU scale's batch, but tens of
#: epochs, the whole validation split every 500 steps and the whole test split at the end.
LONG_SCALE = {
    "cifar": {"data": {"val_max_images": None, "test_max_images": None},
              "train": {"batch_size": 64, "eval_every": 500, "checkpoint_every": 500, "log_every": 50,
                        "eval_batch_size": 500, "progress": True, "test_at_end": True}},
}

#: The smoke scale: bundled sample data, a small model, a handful of steps.
TINY_SCALE = {
    "data": {"name": "sample", "val_max_images": 32, "test_max_images": 32, "image_size": None},
    "model": {"channels": 16, "res_channels": 8, "num_res_blocks": 1, "embed_dim": 8},
    "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 3,
              "eval_batch_size": 32, "progress": False, "test_at_end": False, "report": False},
}
TINY_CODEBOOK = 32
SCALES = ("cpu", "long", "paper", "tiny")


def long_experiments() -> list[str]:
    """Names of the experiments defined at the long scale."""
    return [name for name, e in EXPERIMENTS.items() if e.long_steps is not None]


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in recursively (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_config(experiment: Experiment, variant: Variant, scale: str, seed: int) -> dict:
    """The full (unresolved) config of one run: base <- scale <- variant <- seed."""
    from .training.config import load_config_file

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    cfg = load_config_file(experiment.base)
    base_q = cfg.get("model", {}).get("quantizer", {})
    quantizer = {"codebook_size": base_q.get("codebook_size", 512)}
    if scale == "cpu":
        cfg = deep_merge(cfg, CPU_SCALE[experiment.dataset_kind])
        cfg = deep_merge(cfg, {"train": {"max_steps": experiment.cpu_steps}})
        cfg = deep_merge(cfg, experiment.cpu_overrides)
    elif scale == "long":
        if experiment.long_steps is None or experiment.dataset_kind not in LONG_SCALE:
            raise ValueError(f"the long scale is defined for {', '.join(long_experiments())} only, "
                             f"not {experiment.name!r}")
        cfg = deep_merge(cfg, LONG_SCALE[experiment.dataset_kind])
        cfg = deep_merge(cfg, {"train": {"max_steps": experiment.long_steps}})
    elif scale == "tiny":
        cfg = deep_merge(cfg, TINY_SCALE)
        quantizer["codebook_size"] = TINY_CODEBOOK
        if cfg["model"].get("arch") == "vqvae2":
            cfg["data"]["image_size"] = 64  # VQ-VAE-2 needs >= 64x64; the sample is 32x32 CIFAR, upsampled
    quantizer.update(variant.quantizer)
    levels = quantizer.get("options", {}).get("levels")
    if levels:  # FSQ: K is the product of its levels at every scale
        quantizer["codebook_size"] = math.prod(levels)
    cfg.setdefault("model", {})["quantizer"] = quantizer  # the variant's table replaces the base's
    cfg = deep_merge(cfg, variant.overrides)
    cfg["seed"] = int(seed)
    return cfg


def plan(experiment: str, scale: str = "cpu", seeds: int | None = None, only=None) -> list:
    """``[(variant, seed, config)]`` of an experiment: the grid of configurations x seeds. ``only``: a list of
    variant labels (exact, case-insensitive) to restrict the grid to."""
    from .models.factory import ConfigError

    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[experiment]
    n = seeds if seeds is not None else exp.seeds.get(scale, 1)
    if scale == "long" and exp.long_steps is None:
        raise ConfigError(f"--scale long is defined for {', '.join(long_experiments())} only, not {experiment!r}")
    if n < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n}")
    variants = exp.variants
    if scale == "long" and exp.long_variants is not None:
        variants = [v for v in variants if v.label in exp.long_variants]
    if only:
        wanted = {o.strip().lower() for o in only}
        unknown = wanted - {v.label.lower() for v in variants}
        if unknown:
            raise ConfigError(f"--only {sorted(unknown)[0]!r} is not a configuration of {experiment} at this scale; "
                              f"choose from: {', '.join(v.label for v in variants)}")
        variants = [v for v in variants if v.label.lower() in wanted]
    return [(v, s, build_config(exp, v, scale, s)) for v in variants for s in range(n)]


# ------------------------------------------------------------------------------------------------- run
def _run_state(run_dir: Path, config: dict) -> str:
    """"done" (summary.json of this exact config, trained to its max_steps), "partial" (a checkpoint to
    resume, also a finished run whose max_steps was raised), or "new"."""
    from .models.factory import ConfigError
    from .training.config import RESUMABLE_CHANGES, changed_keys, resolve_config, resolve_saved_config

    if (run_dir / "summary.json").is_file() and (run_dir / "config.json").is_file():
        saved = resolve_saved_config(json.loads((run_dir / "config.json").read_text()))
        resolved = resolve_config(config)
        if [k for k in changed_keys(saved, resolved) if k not in RESUMABLE_CHANGES]:
            raise ConfigError(f"{run_dir} holds a finished run of a different configuration; use another --out "
                              "or delete that folder")
        steps = json.loads((run_dir / "summary.json").read_text()).get("steps", 0)
        if steps >= resolved["train"]["max_steps"]:
            return "done"
    return "partial" if (run_dir / "checkpoints" / "last.pt").is_file() else "new"


def run_finished(run_dir: Path) -> bool:
    """True if the run wrote its summary.json after training to the max_steps of its config.json."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("steps", 0) >= config.get("train", {}).get("max_steps", math.inf)


def experiment_dir(out_dir, experiment: str, scale: str) -> Path:
    """Folder of an experiment's runs and outputs: ``OUT/EXPERIMENT`` at the cpu scale, else ``OUT/EXPERIMENT-SCALE``."""
    return Path(out_dir) / (experiment if scale == "cpu" else f"{experiment}-{scale}")


def run_experiment(experiment: str, out_dir, scale: str = "cpu", seeds: int | None = None, data_dir=None,
                   device: str | None = None, log=print, train_runs: bool = True, only=None) -> list:
    """Train every run of the experiment that is not finished yet; returns ``[(variant, seed, run_dir)]``.
    ``train_runs=False`` trains nothing and only lists the runs (to aggregate a partly finished grid)."""
    from .training import train

    runs = plan(experiment, scale, seeds)
    selected = {v.label for v, _, _ in plan(experiment, scale, seeds, only)} if only else None
    root = experiment_dir(out_dir, experiment, scale)
    splits_cache: dict = {}
    done = []
    for i, (variant, seed, cfg) in enumerate(runs, 1):
        if data_dir is not None:
            cfg["data"]["data_dir"] = str(data_dir)
        if device is not None:
            cfg["train"]["device"] = device
        run_dir = root / variant.slug / f"seed{seed}"
        state = _run_state(run_dir, cfg)
        tag = f"[{i}/{len(runs)}] {experiment}: {variant.label}, seed {seed}"
        if state == "done":
            log(f"{tag}: finished earlier, skipped")
        elif not train_runs or (selected is not None and variant.label not in selected):
            log(f"{tag}: {'unfinished' if state == 'partial' else 'not started'}, not trained "
                f"({'--no-train' if not train_runs else 'not in --only'})")
        else:
            log(f"{tag}: {'resuming' if state == 'partial' else 'training'} -> {run_dir}")
            t0 = time.perf_counter()
            # resume=True also restarts a run killed before its first checkpoint (the trainer decides; it
            # never deletes anything and refuses a folder that is not one of our runs)
            train(cfg, run_dir, resume=True, splits=_splits_for(cfg, splits_cache))
            log(f"{tag}: done in {time.perf_counter() - t0:.0f} s")
        done.append((variant, seed, run_dir))
    return done


def _splits_for(cfg: dict, cache: dict):
    from .data import splits_from_config, splits_key

    d = cfg["data"]
    key = splits_key(d)
    if key not in cache:
        cache[key] = splits_from_config(d)
    return cache[key]


# ----------------------------------------------------------------------------------------- aggregation
def _mean_std(values):
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def reference_threshold(experiment: str, runs):
    """The common convergence threshold of an experiment's table: the mean best validation MSE of its
    EMA-VQ reference (the first variant with ``type = "ema"``) over its finished runs, or None."""
    exp = EXPERIMENTS[experiment]
    ref = next((v for v in exp.variants if v.quantizer.get("type") == "ema"), None)
    if ref is None:
        return None
    best = [json.loads((d / "summary.json").read_text())["best_val_recon"] for v, _, d in runs
            if v.label == ref.label and run_finished(d)]
    best = [b for b in best if b is not None]
    return sum(best) / len(best) if best else None


def steps_to_reach(evals, threshold):
    """First evaluation step whose validation MSE is <= ``threshold`` (None if never or no threshold)."""
    if threshold is None:
        return None
    return next((int(st) for st, v in evals if v <= threshold), None)


def aggregate(experiment: str, runs) -> list:
    """One row per variant over its *finished* runs (:func:`run_finished`): ``{"label", "n", "planned",
    "loss": (mean, std), "c10", "c20", "reach": (mean, std), "reached": k, "perplexity": [mean per level],
    "used_codes": [mean per level], "best_step", "test": (mean, std)}``; the loss is the best validation
    reconstruction MSE x the experiment's loss scale, ``test`` the final model's test-split MSE (same scale;
    None unless every finished run has one), ``reach`` the steps to reach the EMA-VQ reference's mean best (:func:`reference_threshold`)
    over the ``reached`` runs that got there. Variants with no finished run get a row with ``n = 0``."""
    exp = EXPERIMENTS[experiment]
    threshold = reference_threshold(experiment, runs)
    rows = []
    for variant in exp.variants:
        dirs = [d for v, _, d in runs if v.label == variant.label]
        if not dirs:
            continue
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs if run_finished(d)]
        row = {"label": variant.label, "n": len(summaries), "planned": len(dirs)}
        if not summaries:
            rows.append({**row, "loss": (None, None), "c10": (None, None), "c20": (None, None),
                         "reach": (None, None), "reached": 0, "perplexity": [], "used_codes": []})
            continue
        loss = _mean_std([s["best_val_recon"] * exp.loss_scale for s in summaries if s["best_val_recon"] is not None])
        reach = [steps_to_reach(s.get("evals", []), threshold) for s in summaries]
        levels = len(summaries[0]["final_perplexity"] or [])
        rows.append({
            **row, "loss": loss,
            "c10": _mean_std([s["converge_10_step"] for s in summaries]),
            "c20": _mean_std([s["converge_20_step"] for s in summaries]),
            "reach": _mean_std(reach), "reached": None if threshold is None else sum(r is not None for r in reach),
            "perplexity": [_mean_std([s["final_perplexity"][lv] for s in summaries])[0] for lv in range(levels)],
            "used_codes": [_mean_std([s["final_used_codes"][lv] for s in summaries])[0] for lv in range(levels)],
            "best_step": _mean_std([s.get("best_step") for s in summaries]),
            # the final model on the test split (whole at the long scale), where every run evaluated it
            "test": (_mean_std([s["test"]["recon"] * exp.loss_scale for s in summaries])
                     if all((s.get("test") or {}).get("recon") is not None for s in summaries) else (None, None)),
        })
    return rows


def _pm(ms, fmt):
    mean, std = ms
    if mean is None:
        return "–"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def markdown_table(experiment: str, rows) -> str:
    """The paper's table layout as markdown, plus "steps to reach EMA-VQ's best" (one common threshold:
    the paper's +10%/+20% steps are relative to each run's own best, which flatters a run that stalls).
    Runs not finished yet are not counted; their variant's row says how many of the planned runs are in."""
    exp = EXPERIMENTS[experiment]
    exponent = int(round(math.log10(exp.loss_scale)))
    rows = list(rows)
    extra = any("organisation" in r for r in rows)
    tested = any((r.get("test") or (None,))[0] is not None for r in rows)  # runs that evaluated the test split
    head = f"| configuration | runs | best val MSE ×10^{exponent} |"
    if tested:
        head += f" test MSE ×10^{exponent} | step of best |"
    head += " steps to EMA-VQ's best | +10% step | +20% step | final perplexity | used codes |"
    if extra:
        head += " topographic error | map smoothness | index-perturbation MSE ratio | ms / step |"
    head += "\n|" + "---|" * (8 + 2 * tested + 4 * extra) + "\n"
    body = ""
    unfinished = False
    for r in rows:
        ppl = " / ".join(f"{p:.0f}" for p in r["perplexity"])
        used = " / ".join(f"{u:.0f}" for u in r["used_codes"])
        runs = str(r["n"])
        if r.get("planned", r["n"]) > r["n"]:
            runs = f"{r['n']} of {r['planned']}*"
            unfinished = True
        if r.get("reached") is None or r["n"] == 0:  # no EMA-VQ reference finished, or no run of this row
            reach = "–"
        else:
            reach = _pm(r["reach"], ".0f") if r["reached"] else "not reached"
        if r.get("reached") and r["reached"] < r["n"]:
            reach += f" ({r['reached']} of {r['n']} runs)"
        body += f"| {r['label']} | {runs} | {_pm(r['loss'], '.2f')} |"
        if tested:
            body += f" {_pm(r.get('test', (None, None)), '.2f')} | {_pm(r.get('best_step', (None, None)), '.0f')} |"
        body += (f" {reach} | {_pm(r['c10'], '.0f')} | {_pm(r['c20'], '.0f')} | {ppl or '–'} | {used or '–'} |")
        if extra:
            org = r.get("organisation", {})
            fmt = {"topographic_error": ".3f", "map_smoothness": ".3f", "perturbation_mse_ratio": ".2f"}
            body += "".join(f" {_pm(org.get(k, (None, None)), f)} |" for k, f in fmt.items())
            body += f" {_fmt_num(r.get('ms_per_step'), '.0f')} |"
        body += "\n"
    if unfinished:
        body += "\n\\* runs still training or not started are not counted in this row.\n"
    if extra:
        body += ("\nTopographic error, map smoothness (decoded-image distance of grid neighbours / of random pairs) and "
                 "index-perturbation MSE ratio (reconstruction MSE with every index moved to a random grid neighbour / "
                 f"clean MSE) of each seed's final model on {ORGANISATION_IMAGES} validation images. For EMA-VQ, "
                 "VectorQuantize and SimVQ the grid is the index order, which nothing organises: their values are the "
                 "unorganised reference; FSQ's grid is its level lattice. ms / step: one training step (forward, "
                 "backward, AdamW) of each configuration, measured side by side in one process "
                 "(median of 12 interleaved rounds).\n")
    return head + body


def _fmt_num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _html_table(rows, experiment: str) -> str:
    md = [line for line in markdown_table(experiment, rows).strip().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


ORGANISATION_IMAGES = 1000
ORGANISATION_KEYS = ("topographic_error", "map_smoothness", "perturbation_mse_ratio")


def organisation_metrics(runs, root: Path, log=print) -> dict:
    """``{run_dir: {key: value of the first level}}`` for every finished run: topographic error, map
    smoothness and index-perturbation robustness of its final model (``last.pt``) on a fixed
    :data:`ORGANISATION_IMAGES`-image subset of its validation split. Cached in ``root/organisation.json``
    (keyed by run directory and step), so a rerun evaluates only new runs."""
    from .fileio import atomic_write_json
    from .report import evaluate_runs, load_run

    cache_path = root / "organisation.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    out = {}
    for _, _, d in runs:
        if not run_finished(d):
            continue
        steps = json.loads((d / "summary.json").read_text())["steps"]
        key = str(d)
        if key in cache and cache[key].get("step") == steps:
            out[key] = cache[key]
            continue
        log(f"organisation metrics: {d}")
        run = load_run(d, "last", device="cpu")
        evaluate_runs([run], max_images=ORGANISATION_IMAGES)
        level = run.model.level_names[-1]  # the bottom level (the only one of a VQ-VAE)
        out[key] = cache[key] = {"step": steps, **{k: run.metrics.get(f"{level}/{k}") for k in ORGANISATION_KEYS}}
        atomic_write_json(cache_path, cache)
    return out


def step_times(experiment: str, runs, root: Path, log=print) -> dict:
    """``{label: ms per training step}``: one config per variant, measured side by side in one process
    (:func:`kohonen_vae.steptime.interleaved_step_times`) on real training images; cached in
    ``root/step_times.json`` (delete it to measure again)."""
    import torch

    from .data import splits_from_config
    from .fileio import atomic_write_json
    from .steptime import interleaved_step_times
    from .training.config import resolve_config

    cache_path = root / "step_times.json"
    if cache_path.is_file():
        return {k: v["ms_per_step"] for k, v in json.loads(cache_path.read_text())["times"].items()}
    configs = {}
    for v, _, d in runs:
        if v.label not in configs and (d / "config.json").is_file():
            configs[v.label] = resolve_config(json.loads((d / "config.json").read_text()))
    if not configs:
        return {}
    first = next(iter(configs.values()))
    splits = splits_from_config(first["data"])
    log(f"measuring training-step times of {len(configs)} configurations side by side ...")
    threads = torch.get_num_threads()
    times = interleaved_step_times(configs, splits.train.images[:512], splits.normalizer, progress=True)
    atomic_write_json(cache_path, {"threads": threads, "times": times,
                                   "note": "median over 12 interleaved rounds of 4 steps, after 3 warm-up steps"})
    return {k: v["ms_per_step"] for k, v in times.items()}


def organisation_columns(experiment: str, runs, rows, root: Path, log=print) -> None:
    """Add ``"organisation"`` ({key: (mean, std)} over finished seeds) and ``"ms_per_step"`` to the rows."""
    metrics = organisation_metrics(runs, root, log)
    times = step_times(experiment, runs, root, log)
    for r in rows:
        vals = [metrics[str(d)] for v, _, d in runs if v.label == r["label"] and str(d) in metrics]
        r["organisation"] = {k: _mean_std([m.get(k) for m in vals]) for k in ORGANISATION_KEYS}
        r["ms_per_step"] = times.get(r["label"])


def write_outputs(experiment: str, runs, out_dir, command: str, scale: str) -> dict:
    """results.md, curves.png (+ the figures experiment's PNGs) and report.html in ``OUT/EXPERIMENT``."""
    import matplotlib.pyplot as plt

    from . import figures
    from .report import evaluate_runs, load_run, render_report
    from .fileio import atomic_write_text
    from .training.checkpoint import read_metrics

    root = experiment_dir(out_dir, experiment, scale)
    exp = EXPERIMENTS[experiment]
    rows = aggregate(experiment, runs)
    if exp.organisation:
        organisation_columns(experiment, runs, rows, root)
    table = markdown_table(experiment, rows)
    pngs = {}
    curve_runs = [(v.label, read_metrics(d / "metrics.jsonl")) for v, _, d in runs if (d / "metrics.jsonl").is_file()]
    pngs["curves"] = figures.save_figure(figures.curves_figure(curve_runs), root / "curves.png")

    first = {}
    for v, s, d in runs:
        if (d / "checkpoints").is_dir() and any((d / "checkpoints" / f"{c}.pt").is_file() for c in ("last", "best")):
            first.setdefault(v.label, d)
    loaded = [load_run(d) for d in first.values()]
    for run, label in zip(loaded, first):
        run.label = label
    images = evaluate_runs(loaded, max_images=512)
    if experiment == "figures":
        by = {r.label: r for r in loaded}
        ema, ksom = by.get("EMA-VQ"), by.get("KSOM hard")
        if ema is not None and ksom is not None:
            size = tuple(images[0].shape[-2:])
            for name, r in (("ema", ema), ("ksom", ksom)):
                pngs[f"mosaic_{name}"] = figures.save_figure(
                    figures.codebook_mosaic(r.model, r.normalizer, size, tile_size=16, title=r.label),
                    root / f"mosaic_{name}.png", dpi=60)
            pngs["offset"] = figures.save_figure(figures.index_offset_figure(
                [(ksom.label, ksom.model, ksom.normalizer), (ema.label, ema.model, ema.normalizer)], images[0][3]),
                root / "offset.png", dpi=70)
        n0_runs = [(v.label, read_metrics(d / "metrics.jsonl")) for v, _, d in runs if v.label.startswith("EMA-VQ")]
        if len(n0_runs) == 2:
            pngs["n0"] = figures.save_figure(figures.curves_figure(n0_runs), root / "n0_training_loss.png", dpi=70)
        for r in loaded:
            q = r.model.quantizers[0]
            if getattr(q, "neighborhood", None) is not None and q.neighborhood.name != "none":
                pngs[f"neighborhood_{q.neighborhood.name}"] = figures.save_figure(
                    figures.neighborhood_figure(q.neighborhood, q.grid, steps=(0, 100), title=r.label),
                    root / f"neighborhood_{q.neighborhood.name}.png", dpi=60)
    plt.close("all")

    md = [f"# {experiment} ({scale} scale)", "", exp.description, "", f"Command: `{command}`", "", table]
    md += [f"![{name}]({p.name})" for name, p in pngs.items()]
    atomic_write_text(root / "results.md", "\n".join(md) + "\n")

    extra = [f"<h2 id='aggregate'>Aggregate over seeds</h2><p>{html.escape(exp.description)}</p>"
             f"<p>Command: <code>{html.escape(command)}</code></p>{_html_table(rows, experiment)}"]
    for name, p in pngs.items():
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        extra.append(f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    page = render_report(loaded, images, title=f"Reproduction: {experiment} ({scale} scale)",
                         preamble="\n".join(extra))
    atomic_write_text(root / "report.html", page)
    return {"table": table, "rows": rows, "results": root / "results.md", "report": root / "report.html",
            "figures": pngs}


def reproduce(experiment: str, out_dir="runs/reproduce", scale: str = "cpu", seeds: int | None = None,
              data_dir=None, device=None, command: str | None = None, log=print, train_runs: bool = True,
              only=None) -> dict:
    """Run (or resume) an experiment and write its table, figures and report; returns the outputs.
    ``train_runs=False`` only aggregates what is there (unfinished runs are marked, not counted)."""
    runs = run_experiment(experiment, out_dir, scale, seeds, data_dir, device, log, train_runs=train_runs, only=only)
    command = command or f"kohonen-vae reproduce {experiment} --scale {scale}" + (f" --seeds {seeds}" if seeds else "")
    return write_outputs(experiment, runs, out_dir, command, scale)


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=list(EXPERIMENTS) + ["channel"],
                        help="which experiment; channel: token errors (bit flips, substitutions) on the finished "
                             "field runs, seed 0 of each configuration (kohonen_vae.channel)")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="cpu: reduced protocol, about an hour or less per experiment on 2 cores (default); "
                             "long: the cpu protocol at 20,000 steps with full validation (main); "
                             "paper: the paper's protocol (GPU); tiny: seconds-long smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: per experiment)")
    parser.add_argument("--out", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    parser.add_argument("--data-dir", default=None, help="where the datasets are (default: search path)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's, auto)")
    parser.add_argument("--only", action="append", default=None, metavar="LABEL",
                        help="train only this configuration (its label as in the table; repeatable); the table "
                             "still lists every configuration, marking those without finished runs")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: aggregate the runs that are there (unfinished ones are marked)")


def run(args) -> int:
    """``kohonen-vae reproduce``: train, aggregate, print the table and where the outputs are."""
    argv = " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("kohonen-vae") else None
    command = f"kohonen-vae {argv}" if argv else None
    if args.experiment == "channel":
        from .channel import channel_from_field

        out = channel_from_field(args.out, args.scale, seed=0, command=command, device=args.device,
                                 data_dir=args.data_dir)
        print()
        print(out["table"])
        print(f"table:  {out['results']}")
        return 0
    out = reproduce(args.experiment, args.out, args.scale, args.seeds, args.data_dir, args.device, command,
                    train_runs=not args.no_train, only=args.only)
    print()
    print(out["table"])
    print(f"table:  {out['results']}")
    print(f"report: {out['report']}")
    return 0


HELP = "run one of the paper's experiments (configurations x seeds), aggregate its table and figures"
