"""A self-contained HTML report of one or more training runs: ``kohonen-vae report RUN_DIR [RUN_DIR ...]``.

The report is one ``report.html`` file with every figure embedded as a base64 PNG ``data:`` URI and a small
inline stylesheet: it needs no network access and no other file to be viewed. It contains

* with several runs: a comparison table (one column per run) and the index-offset figure of all runs;
* the training curves of all runs (runs whose configs differ only in the seed are grouped: mean + min-max);
* per run: the config, the final metrics (summary.json plus :func:`kohonen_vae.metrics.evaluate_codebook`
  on the validation images), reconstructions, the codebook mosaic of every level, U-matrix and hit map, the
  neighbourhood kernel at t = 0 and t = 100 (KSOM/GD-SOM), and the index-offset figure.

Python::

    from kohonen_vae.report import write_report
    write_report(["runs/demo/ema", "runs/demo/ksom-hard"], "runs/demo/report.html")

The file is written atomically (temp file + fsync + ``os.replace``). It never replaces a file that is not a
kohonen-vae report (reports carry ``<meta name="generator" content="kohonen-vae">``).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

#: validation images evaluated per run when neither --max-images nor data.val_max_images says otherwise
DEFAULT_MAX_IMAGES = 2048
#: the generator tag of every report (a file without it is not ours and is never replaced)
GENERATOR = "kohonen-vae"


# -------------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """A finished (or interrupted) run loaded back from its directory."""

    path: Path
    config: dict
    records: list
    summary: dict | None
    model: torch.nn.Module
    normalizer: object
    checkpoint: str            # which checkpoint the model comes from ("last" or "best")
    step: int                  # optimiser steps of that checkpoint
    label: str = ""
    metrics: dict = field(default_factory=dict)
    counts: list = field(default_factory=list)


def describe_config(config: dict) -> str:
    """Short method label of a run config: "EMA-VQ", "KSOM-hard", "KSOM-exponential 1-D", "VQ (gradient)",
    "GD-SOM-hard", "FSQ" (vector-quantize-pytorch classes by name), with the collapse fixes in use
    (" + k-means", " + restarts", " + uniform init") and " VQ-VAE-2" for two-level models."""
    model = config.get("model", {})
    q = model.get("quantizer", {})
    qtype = q.get("type", "ksom")
    nb = q.get("neighborhood", "hard")
    if isinstance(nb, dict):  # a table {kind = "hard", radius = 2.5}
        nb = nb.get("kind", "hard")
    if qtype == "ema" or (qtype == "ksom" and nb == "none"):
        label = "EMA-VQ"
    elif qtype == "ksom":
        label = f"KSOM-{nb}"
    elif qtype == "gdsom":
        label = f"GD-SOM-{nb}"
    elif qtype == "vqp":
        label = str(q.get("cls", "VectorQuantize"))
    else:
        label = "VQ (gradient)"
    if q.get("grid_dims", 2) == 1 and qtype in ("ksom", "gdsom") and label != "EMA-VQ" and not q.get("grid_shape"):
        label += " 1-D"
    if q.get("codebook_init", "normal") != "normal":
        label += f" + {q['codebook_init']} init"
    if q.get("kmeans_init"):
        label += " + k-means"
    if q.get("threshold_ema_dead_code"):
        label += " + restarts"
    if model.get("arch") == "vqvae2":
        label += " VQ-VAE-2"
    return label


def assign_labels(runs: Sequence[Run]) -> None:
    """Set ``run.label``: runs whose configs differ only in the seed (or in settings that change nothing
    computed) share a label, so the curves show them as one mean line with a band; different configurations
    that would get the same :func:`describe_config` label are told apart by their directory name."""
    from .training.config import semantic_key

    keys = [semantic_key(r.config) for r in runs]
    base = {k: describe_config(r.config) for r, k in zip(runs, keys)}
    for r, k in zip(runs, keys):
        clash = {kk for kk, b in base.items() if b == base[k]}
        if len(clash) > 1:
            first = next(rr for rr, kk in zip(runs, keys) if kk == k)
            r.label = f"{base[k]} [{first.path.name}]"
        else:
            r.label = base[k]


def load_run(run_dir, checkpoint: str = "last", device=None) -> Run:
    """Load a run directory written by :func:`kohonen_vae.training.train`: ``config.json``, ``metrics.jsonl``,
    ``summary.json`` (None if training did not finish) and the model of ``checkpoints/{checkpoint}.pt`` (falls
    back to the other checkpoint if that one is missing) with the run's normaliser, in eval mode on ``device``."""
    from .data import Normalizer
    from .training.checkpoint import load_model, read_metrics

    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.json); give the folder that "
                                "`kohonen-vae train --out` wrote")
    if checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', got {checkpoint!r}")
    order = [checkpoint, "best" if checkpoint == "last" else "last"]
    found = next((c for c in order if (path / "checkpoints" / f"{c}.pt").is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path}/checkpoints holds neither last.pt nor best.pt; the run saved no checkpoint "
                                "yet (train longer than train.checkpoint_every steps, or wait for it to finish)")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(path, which=found, map_location=device)
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    config = json.loads((path / "config.json").read_text())
    return Run(path=path, config=config, records=read_metrics(path / "metrics.jsonl"), summary=summary,
               model=model, normalizer=Normalizer.from_dict(info.normalizer), checkpoint=found,
               step=info.step, label=describe_config(config))


def evaluation_images(config: dict, max_images: int | None = None, _splits_cache: dict | None = None) -> torch.Tensor:
    """The run's validation images (uint8 (N, C, H, W)), the same split as in training, at most
    ``max_images`` (default: data.val_max_images, else DEFAULT_MAX_IMAGES): the fixed seeded random subset
    that training evaluates on (``data.evaluation_subset``), not the first images of the folder."""
    from .data import evaluation_subset, splits_from_config, splits_key

    d = config["data"]
    key = splits_key(d)
    cache = _splits_cache if _splits_cache is not None else {}
    if key not in cache:
        cache[key] = splits_from_config(d, download=False)
    n = max_images or d.get("val_max_images") or DEFAULT_MAX_IMAGES
    return evaluation_subset(cache[key].val.images, n, d.get("split_seed", 0))


def evaluate_runs(runs: Sequence[Run], max_images: int | None = None, batch_size: int = 256,
                  progress: bool = False) -> list:
    """Fill ``run.metrics`` and ``run.counts`` of loaded runs (:func:`kohonen_vae.metrics.evaluate_codebook`
    on each run's evaluation images) and return those images, one tensor per run. Runs sharing a dataset
    and split decode it once; runs sharing the evaluation images share the tensor."""
    from .data import splits_key
    from .metrics import evaluate_codebook

    splits_cache: dict = {}
    images_cache: dict = {}
    images = []
    for run in runs:
        d = run.config["data"]
        key = (splits_key(d), max_images or d.get("val_max_images"))
        if key not in images_cache:
            images_cache[key] = evaluation_images(run.config, max_images, splits_cache)
        imgs = images_cache[key]
        images.append(imgs)
        run.metrics, run.counts = evaluate_codebook(run.model, imgs, run.normalizer, batch_size=batch_size,
                                                    progress=progress, return_counts=True)
    return images


# ----------------------------------------------------------------------------------------------- HTML
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1400px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em;margin-top:1.3em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.2em}pre{background:#f7f7f7;padding:.6em;font-size:.78em;
overflow-x:auto}.muted{color:#777;font-size:.85em}details{margin:.4em 0}
""".strip()

CAPTIONS = {
    "curves": "Training (solid) and validation (dashed) loss, perplexity and used codes over steps; seeds of one "
              "configuration as mean and min-max band. KSOM should reach a low loss sooner and use more codes.",
    "offset": "Every code index moved by (o, o) on the grid before decoding. KSOM: the image degrades gradually "
              "with |o|; EMA-VQ: any offset breaks it.",
    "reconstructions": "Validation inputs (left) and their reconstructions (right), codebook frozen.",
    "mosaic": "Each code decoded alone, at its grid position. KSOM: neighbouring codes decode to similar images "
              "(islands); EMA-VQ: no order.",
    "umatrix": "U-matrix: dark = a code is close to its grid neighbours (organised), bright ridges = borders. "
               "Hit map: how often each code is chosen; black cells are dead codes.",
    "neighborhood": "The neighbourhood h_t around one winner at t = 0 and t = 100: how far one input's update "
                    "spreads over the grid, and how fast that shrinks.",
}

METRIC_HELP = {
    "perplexity": "exp(entropy) of code usage over the evaluation set (K = uniform)",
    "used_codes": "codes chosen at least once",
    "dead_fraction": "share of codes never chosen",
    "quantization_mse": "mean squared error per element between z and its code",
    "quantization_error": "mean Euclidean distance between z and its code",
    "topographic_error": "share of vectors whose two nearest codes are not grid neighbours",
    "map_smoothness": "decoded-image distance of grid neighbours / of random pairs (< 1: organised)",
    "codebook_smoothness": "code-vector distance of grid neighbours / of random pairs",
    "topographic_product": "Bauer-Pawelzik topographic product (0 = perfectly ordered)",
    "most_used_code": "index of the most used code",
}


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _figure(fig, alt: str, caption: str, fig_id: str) -> str:
    import matplotlib.pyplot as plt

    from .figures import figure_png_bytes

    png = figure_png_bytes(fig)
    plt.close(fig)
    return (f'<figure id="{fig_id}">{_img(png, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>')


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, list):
        return " / ".join(_fmt(x) for x in v)
    return html.escape(str(v))


def run_summary_rows(run: Run) -> list[tuple[str, object, str]]:
    """``(name, value, explanation)`` rows of a run's final numbers: training summary, then the codebook
    metrics of every level."""
    s = run.summary or {}
    test = s.get("test") or {}
    rows = [
        ("method", run.label, "quantiser and neighbourhood"),
        ("steps", s.get("steps", run.step), "optimiser steps trained"),
        ("best val MSE", s.get("best_val_recon"), "best validation reconstruction MSE (normalised pixels)"),
        ("best step", s.get("best_step"), "step of the best validation MSE"),
        ("+20% step", s.get("converge_20_step"), "first evaluation with val MSE <= 1.2 x best"),
        ("+10% step", s.get("converge_10_step"), "first evaluation with val MSE <= 1.1 x best"),
        ("test MSE", test.get("recon"), "reconstruction MSE on the test split"),
        ("eval images", run.metrics.get("num_images"), f"validation images evaluated below ({run.checkpoint}.pt, "
                                                         f"step {run.step})"),
        ("eval recon MSE", run.metrics.get("recon_mse"), "reconstruction MSE on those images"),
    ]
    for key, value in run.metrics.items():
        if "/" in key:
            level, name = key.split("/", 1)
            rows.append((f"{level} {name.replace('_', ' ')}", value, METRIC_HELP.get(name, "")))
    return rows


def _metrics_table(run: Run) -> str:
    body = "".join(f"<tr><td>{html.escape(n)}</td><td>{_fmt(v)}</td><td class=muted style='text-align:left'>"
                   f"{html.escape(h)}</td></tr>" for n, v, h in run_summary_rows(run))
    return f"<table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{body}</table>"


def _comparison_table(runs: Sequence[Run]) -> str:
    tables = [run_summary_rows(r) for r in runs]
    names = []
    for t in tables:
        for n, _, _ in t:
            if n not in names:
                names.append(n)
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(r.path.name)}</th>" for r in runs) + "</tr>"
    body = ""
    for n in names:
        cells = []
        for t in tables:
            v = next((v for nn, v, _ in t if nn == n), None)
            cells.append(f"<td>{_fmt(v)}</td>")
        body += f"<tr><td>{html.escape(n)}</td>{''.join(cells)}</tr>"
    return f"<table>{head}{body}</table>"


def _has_neighborhood(model) -> bool:
    nb = getattr(model.quantizers[0], "neighborhood", None)
    return nb is not None and getattr(nb, "name", "none") != "none"


def _run_section(i: int, run: Run, images: torch.Tensor, show_offset: bool) -> str:
    from . import figures

    model, norm = run.model, run.normalizer
    names = list(model.level_names)
    parts = [f'<h2 id="run-{i}">{html.escape(run.label)} — {html.escape(str(run.path))}</h2>']
    parts.append(f'<h3 id="run-{i}-metrics">Final metrics</h3>{_metrics_table(run)}')
    cfg_json = html.escape(json.dumps(run.config, indent=2))
    parts.append(f'<details id="run-{i}-config"><summary>config.json</summary><pre>{cfg_json}</pre></details>')
    parts.append('<h3>Reconstructions</h3>' + _figure(
        figures.reconstructions_figure(model, images[:16], norm), "reconstructions",
        CAPTIONS["reconstructions"], f"run-{i}-reconstructions"))
    fixed = [run.metrics.get(f"{n}/most_used_code", 0) or 0 for n in names]
    parts.append("<h3>Codebook mosaic</h3>" + _figure(
        figures.codebook_mosaic(model, norm, tuple(images.shape[-2:]), fixed_codes=fixed,
                                tile_size=min(32, images.shape[-1])),
        "codebook mosaic", CAPTIONS["mosaic"] + (" Other level fixed to its most used code." if len(names) > 1 else ""),
        f"run-{i}-mosaic"))
    for lv, name in enumerate(names):
        q = model.quantizers[lv]
        parts.append(f"<h3>U-matrix and hit map ({html.escape(name)})</h3>" + _figure(
            figures.umatrix_figure(q.codebook, q.grid, run.counts[lv] if run.counts else None),
            f"U-matrix {name}", CAPTIONS["umatrix"], f"run-{i}-umatrix-{name}"))
    if _has_neighborhood(model):
        q = model.quantizers[0]
        parts.append("<h3>Neighbourhood</h3>" + _figure(
            figures.neighborhood_figure(q.neighborhood, q.grid, steps=(0, 100)), "neighbourhood",
            CAPTIONS["neighborhood"], f"run-{i}-neighborhood"))
    if show_offset:
        parts.append("<h3>Index offset</h3>" + _figure(
            figures.index_offset_figure([(run.label, model, norm)], images[0]), "index offset",
            CAPTIONS["offset"], f"run-{i}-offset"))
    return "\n".join(parts)


def render_report(runs: Sequence[Run], images: Sequence[torch.Tensor], title: str | None = None,
                  preamble: str = "") -> str:
    """The report's HTML text for loaded and evaluated runs (``run.metrics``/``run.counts`` filled) and each
    run's evaluation images; ``preamble`` (HTML) goes right after the header."""
    from . import figures

    title = title or ("Run report: " + runs[0].path.name if len(runs) == 1
                      else "Comparison: " + ", ".join(r.label for r in runs))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=muted>kohonen-vae report, {now}; runs: "
             + ", ".join(f'<a href="#run-{i}">{html.escape(str(r.path))}</a>' for i, r in enumerate(runs)) + "</p>",
             preamble]
    if len(runs) > 1:
        parts.append(f'<h2 id="comparison">Comparison</h2>{_comparison_table(runs)}')
    parts.append('<h2 id="curves-section">Training curves</h2>' + _figure(
        figures.curves_figure([(r.label, r.records) for r in runs]), "training curves", CAPTIONS["curves"], "curves"))
    if len(runs) > 1:
        offset_runs = [(r.label if sum(rr.label == r.label for rr in runs) == 1 else f"{r.label} [{r.path.name}]",
                        r.model, r.normalizer) for r in runs]
        parts.append('<h2 id="offset-section">Index offset</h2>' + _figure(
            figures.index_offset_figure(offset_runs, images[0][0]), "index offset", CAPTIONS["offset"], "offset"))
    for i, (run, imgs) in enumerate(zip(runs, images)):
        parts.append(_run_section(i, run, imgs, show_offset=len(runs) == 1))
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=\"generator\" content=\"{GENERATOR}\">"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def format_key_metrics(runs: Sequence[Run]) -> str:
    """Plain-text table of each run's headline numbers (per level): validation MSE of the evaluated
    checkpoint, perplexity, used codes, topographic error and map smoothness."""
    header = ("run", "method", "level", "val MSE", "perplexity", "used", "topo err", "map smooth")
    rows = []
    for r in runs:
        for level in r.model.level_names:
            m = lambda k: r.metrics.get(f"{level}/{k}")  # noqa: E731
            rows.append((r.path.name, r.label, level, _plain(r.metrics.get("recon_mse")), _plain(m("perplexity")),
                         _plain(m("used_codes")), _plain(m("topographic_error")), _plain(m("map_smoothness"))))
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    line = lambda x: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))  # noqa: E731
    return "\n".join([line(header)] + [line(x) for x in rows])


def _plain(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def is_report_file(path) -> bool:
    """True if ``path`` is a report this package wrote (its generator tag is in the first 2 KiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return False
    return f'name="generator" content="{GENERATOR}"'.encode() in head


def safe_report_path(path) -> Path:
    """``path`` if a report may be written there: it does not exist, or it is one of our reports. Raises
    :class:`~kohonen_vae.errors.ConfigError` for a folder or someone else's file (never replaced)."""
    from .errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give the report's file name, e.g. {path / 'report.html'}")
    if path.exists() and not is_report_file(path):
        raise ConfigError(f"{path} exists and is not a kohonen-vae report; it is left alone: choose another --out")
    return path


def write_report(run_dirs, out_path=None, *, checkpoint: str = "last", max_images: int | None = None,
                 device=None, batch_size: int = 256, title: str | None = None, progress: bool = False,
                 echo: bool = False) -> Path:
    """Load the runs, evaluate their codebooks on their validation images, draw every figure and write one
    self-contained HTML file atomically; returns its path. Default ``out_path``: ``RUN_DIR/report.html`` for
    one run, ``report.html`` in the current directory for several. An existing file there is replaced only
    if it is a kohonen-vae report. ``echo`` prints :func:`format_key_metrics` of the runs."""
    from .fileio import atomic_write_text

    run_dirs = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if out_path is None:
        out_path = run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html")
    out_path = safe_report_path(out_path)
    runs = [load_run(p, checkpoint, device) for p in run_dirs]
    assign_labels(runs)
    images = evaluate_runs(runs, max_images, batch_size, progress)
    if echo:
        print(format_key_metrics(runs))
    text = render_report(runs, images, title)
    atomic_write_text(out_path, text)
    return out_path


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kohonen-vae report``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `train`")
    parser.add_argument("--out", help="output HTML file (default: RUN_DIR/report.html for one run, "
                                      "./report.html for several); only a kohonen-vae report is ever replaced")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last",
                        help="which checkpoint of each run to analyse (default: last)")
    parser.add_argument("--max-images", type=int, default=None,
                        help=f"validation images to evaluate per run (default: data.val_max_images or "
                             f"{DEFAULT_MAX_IMAGES})")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--title", default=None, help="report title")


def run(args) -> int:
    """``kohonen-vae report``: write the report and print its path."""
    from .errors import ConfigError

    if args.max_images is not None and args.max_images < 1:
        raise ConfigError(f"--max-images must be a positive integer, got {args.max_images}")
    try:
        path = write_report(args.run_dirs, args.out, checkpoint=args.checkpoint, max_images=args.max_images,
                            device=args.device, title=args.title, progress=True, echo=True)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    print(f"report: {path}")
    return 0


HELP = "write a self-contained HTML report (figures, metrics, comparison) of one or more runs"


def main(argv=None) -> int:
    """``python -m kohonen_vae.report RUN_DIR [RUN_DIR ...]``: the same as ``kohonen-vae report``."""
    from .errors import run_command

    parser = argparse.ArgumentParser(prog="python -m kohonen_vae.report", description=HELP)
    add_arguments(parser)
    return run_command("report", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
