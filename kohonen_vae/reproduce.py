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
docs/results.md for how it differs). ``tiny`` is a seconds-long smoke scale for tests.
"""
from __future__ import annotations

import argparse
import base64
import copy
import html
import json
import math
import shutil
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
    name: str
    description: str
    base: str                      # bundled config name
    variants: list
    seeds: dict                    # scale -> default number of seeds
    loss_scale: int = 1000         # the table reports best validation MSE x loss_scale (x10^4 for faces)
    dataset_kind: str = "cifar"    # which CPU-scale settings apply


def _robustness_variants():
    out = []
    for update_unused, mode in ((True, "original"), (False, "no-update")):
        for q, name in ((EMA, "EMA-VQ"), (HARD, "KSOM hard"), (GAUSS, "KSOM Gaussian")):
            for n0 in (0.0, 1.0):
                out.append(Variant(f"{mode} {name} N0={n0:g}", {**q, "count_init": n0, "update_unused": update_unused}))
    return out


EXPERIMENTS = {
    "main": Experiment(
        "main", "EMA-VQ vs KSOM-hard vs KSOM-Gaussian (2-D grid, N0 = 1) on CIFAR-10: final loss and convergence "
        "speed (the paper's main table, CIFAR-10 column).", "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD), Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 5, "cpu": 3, "tiny": 1}),
    "robustness": Experiment(
        "robustness", "{original, no-update} x {EMA-VQ, KSOM hard, KSOM Gaussian} x N0 in {0, 1} on CIFAR-10: "
        "EMA-VQ with N0 = 0 loses codes; KSOM is robust to it.", "cifar10-ksom-hard", _robustness_variants(),
        seeds={"paper": 5, "cpu": 3, "tiny": 1}),
    "ablation": Experiment(
        "ablation", "Neighbourhood ablation on CIFAR-10: none; hard 1-D; hard 2-D with tau in {1, 0.1, 0.01}; "
        "Gaussian 1-D; Gaussian 2-D with tau in {1, 0.1, 0.01}.", "cifar10-ksom-hard",
        [Variant("none (EMA-VQ)", EMA), Variant("hard 1-D tau=0.1", {**HARD, "grid_dims": 1, "shrink": 0.1})]
        + [Variant(f"hard 2-D tau={tau:g}", {**HARD, "shrink": tau}) for tau in (1.0, 0.1, 0.01)]
        + [Variant("Gaussian 1-D tau=0.1", {**GAUSS, "grid_dims": 1, "shrink": 0.1})]
        + [Variant(f"Gaussian 2-D tau={tau:g}", {**GAUSS, "shrink": tau}) for tau in (1.0, 0.1, 0.01)],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}),
    "gradient-som": Experiment(
        "gradient-som", "Gradient-descent SOM (neighbours pulled towards the detached winner, as the authors; and "
        "towards the input, SOM-VAE) vs EMA-VQ vs KSOM-hard vs the original gradient VQ on CIFAR-10.",
        "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD),
         Variant("GD-SOM hard (winner)", {"type": "gdsom", "neighborhood": "hard", "target": "winner"}),
         Variant("GD-SOM hard (input)", {"type": "gdsom", "neighborhood": "hard", "target": "input"}),
         Variant("VQ (gradient)", {"type": "gradient"})],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}),
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
        seeds={"paper": 3, "cpu": 1, "tiny": 1}),
    "faces": Experiment(
        "faces", "VQ-VAE-2 on faces (UTKFace 64x64, the stand-in for the paper's CelebA-HQ + AFHQ mixture): "
        "EMA-VQ vs KSOM-hard vs KSOM-Gaussian; loss reported x10^4 as in the paper.", "faces-vqvae2",
        [Variant("EMA-VQ", EMA), Variant("KSOM hard", HARD), Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 3, "cpu": 2, "tiny": 1}, loss_scale=10_000, dataset_kind="faces"),
    "figures": Experiment(
        "figures", "The paper's figures on CIFAR-10: codebook mosaics (EMA-VQ vs KSOM), index offset, perplexity "
        "over training, the N0 = 0 vs N0 = 1 training loss of EMA-VQ, and neighbourhood heat-maps.",
        "cifar10-ksom-hard",
        [Variant("EMA-VQ", EMA), Variant("EMA-VQ N0=0", {**EMA, "count_init": 0.0}), Variant("KSOM hard", HARD),
         Variant("KSOM Gaussian", GAUSS)],
        seeds={"paper": 1, "cpu": 1, "tiny": 1}),
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
CPU_STEPS = {"main": 1000, "robustness": 300, "ablation": 600, "gradient-som": 800, "sensitivity": 500,
             "faces": 600, "figures": 1000}
CPU_OVERRIDES = {"robustness": {"data": {"val_max_images": 1000}}}

#: The smoke scale: bundled sample data, a small model, a handful of steps.
TINY_SCALE = {
    "data": {"name": "sample", "val_max_images": 32, "test_max_images": 32, "image_size": None},
    "model": {"channels": 16, "res_channels": 8, "num_res_blocks": 1, "embed_dim": 8},
    "train": {"batch_size": 8, "max_steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 3,
              "eval_batch_size": 32, "progress": False, "test_at_end": False, "report": False},
}
TINY_CODEBOOK = 32
SCALES = ("cpu", "paper", "tiny")


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
        cfg = deep_merge(cfg, {"train": {"max_steps": CPU_STEPS[experiment.name]}})
        cfg = deep_merge(cfg, CPU_OVERRIDES.get(experiment.name, {}))
    elif scale == "tiny":
        cfg = deep_merge(cfg, TINY_SCALE)
        quantizer["codebook_size"] = TINY_CODEBOOK
        if cfg["model"].get("arch") == "vqvae2":
            cfg["data"]["image_size"] = 64  # VQ-VAE-2 needs >= 64x64; the sample is 32x32 CIFAR, upsampled
    quantizer.update(variant.quantizer)
    cfg.setdefault("model", {})["quantizer"] = quantizer  # the variant's table replaces the base's
    cfg = deep_merge(cfg, variant.overrides)
    cfg["seed"] = int(seed)
    return cfg


def plan(experiment: str, scale: str = "cpu", seeds: int | None = None) -> list:
    """``[(variant, seed, config)]`` of an experiment: the grid of configurations x seeds."""
    from .models.factory import ConfigError

    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[experiment]
    n = seeds if seeds is not None else exp.seeds[scale]
    if n < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n}")
    return [(v, s, build_config(exp, v, scale, s)) for v in exp.variants for s in range(n)]


# ------------------------------------------------------------------------------------------------- run
def _run_state(run_dir: Path, config: dict) -> str:
    """"done" (summary.json of this exact config), "partial" (a checkpoint to resume), or "new"."""
    from .models.factory import ConfigError
    from .training.config import RESUMABLE_CHANGES, changed_keys, resolve_config

    if (run_dir / "summary.json").is_file() and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        if not [k for k in changed_keys(saved, resolve_config(config)) if k not in RESUMABLE_CHANGES]:
            return "done"
        raise ConfigError(f"{run_dir} holds a finished run of a different configuration; use another --out "
                         "or delete that folder")
    return "partial" if (run_dir / "checkpoints" / "last.pt").is_file() else "new"


def run_experiment(experiment: str, out_dir, scale: str = "cpu", seeds: int | None = None, data_dir=None,
                   device: str | None = None, log=print) -> list:
    """Train every run of the experiment that is not finished yet; returns ``[(variant, seed, run_dir)]``."""
    from .training import train

    runs = plan(experiment, scale, seeds)
    root = Path(out_dir) / experiment
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
        else:
            if state == "new" and run_dir.exists():
                shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing worth keeping
            log(f"{tag}: {'resuming' if state == 'partial' else 'training'} -> {run_dir}")
            t0 = time.perf_counter()
            train(cfg, run_dir, resume=state == "partial", splits=_splits_for(cfg, splits_cache))
            log(f"{tag}: done in {time.perf_counter() - t0:.0f} s")
        done.append((variant, seed, run_dir))
    return done


def _splits_for(cfg: dict, cache: dict):
    from .data import splits_from_config

    d = cfg["data"]
    key = json.dumps([d.get("name"), d.get("data_dir"), d.get("image_size"), d.get("val_fraction", 0.2),
                      d.get("split_seed", 0)], default=str)
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


def aggregate(experiment: str, runs) -> list:
    """One row per variant: ``{"label", "n", "loss": (mean, std), "c10": (mean, std), "c20": (mean, std),
    "perplexity": [mean per level], "used_codes": [mean per level]}`` from the runs' summary.json; the loss
    is the best validation reconstruction MSE x the experiment's loss scale."""
    exp = EXPERIMENTS[experiment]
    rows = []
    for variant in exp.variants:
        summaries = [json.loads((d / "summary.json").read_text()) for v, _, d in runs
                     if v.label == variant.label and (d / "summary.json").is_file()]
        if not summaries:
            continue
        loss = _mean_std([s["best_val_recon"] * exp.loss_scale for s in summaries if s["best_val_recon"] is not None])
        levels = len(summaries[0]["final_perplexity"] or [])
        rows.append({
            "label": variant.label, "n": len(summaries), "loss": loss,
            "c10": _mean_std([s["converge_10_step"] for s in summaries]),
            "c20": _mean_std([s["converge_20_step"] for s in summaries]),
            "perplexity": [_mean_std([s["final_perplexity"][lv] for s in summaries])[0] for lv in range(levels)],
            "used_codes": [_mean_std([s["final_used_codes"][lv] for s in summaries])[0] for lv in range(levels)],
        })
    return rows


def _pm(ms, fmt):
    mean, std = ms
    if mean is None:
        return "–"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def markdown_table(experiment: str, rows) -> str:
    """The paper's table layout as markdown."""
    exp = EXPERIMENTS[experiment]
    exponent = int(round(math.log10(exp.loss_scale)))
    head = (f"| configuration | runs | best val MSE ×10^{exponent} | +10% step | +20% step | final perplexity "
            "| used codes |\n|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        ppl = " / ".join(f"{p:.0f}" for p in r["perplexity"])
        used = " / ".join(f"{u:.0f}" for u in r["used_codes"])
        body += (f"| {r['label']} | {r['n']} | {_pm(r['loss'], '.2f')} | {_pm(r['c10'], '.0f')} | "
                 f"{_pm(r['c20'], '.0f')} | {ppl} | {used} |\n")
    return head + body


def _html_table(rows, experiment: str) -> str:
    md = markdown_table(experiment, rows).strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_outputs(experiment: str, runs, out_dir, command: str, scale: str) -> dict:
    """results.md, curves.png (+ the figures experiment's PNGs) and report.html in ``OUT/EXPERIMENT``."""
    import matplotlib.pyplot as plt

    from . import figures
    from .report import evaluation_images, load_run, render_report
    from .metrics import evaluate_codebook
    from .fileio import atomic_write_text
    from .training.checkpoint import read_metrics

    root = Path(out_dir) / experiment
    exp = EXPERIMENTS[experiment]
    rows = aggregate(experiment, runs)
    table = markdown_table(experiment, rows)
    pngs = {}
    curve_runs = [(v.label, read_metrics(d / "metrics.jsonl")) for v, _, d in runs if (d / "metrics.jsonl").is_file()]
    pngs["curves"] = figures.save_figure(figures.curves_figure(curve_runs), root / "curves.png")

    first = {}
    for v, s, d in runs:
        first.setdefault(v.label, d)
    loaded = [load_run(d) for d in first.values()]
    for run, label in zip(loaded, first):
        run.label = label
    images = []
    for run in loaded:
        imgs = evaluation_images(run.config, 512)
        images.append(imgs)
        run.metrics, run.counts = evaluate_codebook(run.model, imgs, run.normalizer, return_counts=True)
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
              data_dir=None, device=None, command: str | None = None, log=print) -> dict:
    """Run (or resume) an experiment and write its table, figures and report; returns the outputs."""
    runs = run_experiment(experiment, out_dir, scale, seeds, data_dir, device, log)
    command = command or f"kohonen-vae reproduce {experiment} --scale {scale}" + (f" --seeds {seeds}" if seeds else "")
    return write_outputs(experiment, runs, out_dir, command, scale)


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=list(EXPERIMENTS), help="which of the paper's experiments")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="cpu: reduced protocol, about an hour or less per experiment on 2 cores (default); "
                             "paper: the paper's protocol (GPU); tiny: seconds-long smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: per experiment)")
    parser.add_argument("--out", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    parser.add_argument("--data-dir", default=None, help="where the datasets are (default: search path)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's, auto)")


def run(args) -> int:
    """``kohonen-vae reproduce``: train, aggregate, print the table and where the outputs are."""
    argv = " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("kohonen-vae") else None
    command = f"kohonen-vae {argv}" if argv else None
    out = reproduce(args.experiment, args.out, args.scale, args.seeds, args.data_dir, args.device, command)
    print()
    print(out["table"])
    print(f"table:  {out['results']}")
    print(f"report: {out['report']}")
    return 0


SUBCOMMAND = ("run one of the paper's experiments (configurations x seeds), aggregate its table and figures",
              add_arguments, run)
