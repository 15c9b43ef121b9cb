"""Command line: ``kohonen-vae <subcommand>`` (also ``python -m kohonen_vae``).

Every subcommand is one entry of :data:`SUBCOMMANDS`: ``name -> (help, add_arguments(parser), run(args) ->
exit code)``. Expected problems (:data:`kohonen_vae.errors.USER_ERRORS`: bad config, missing dataset, run that
cannot be resumed, damaged checkpoint, full disk ...) reach the user as one ``error:`` line without a
traceback and exit code 2 (:func:`kohonen_vae.errors.run_command`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from . import export, report, reproduce, tokens
from .errors import ConfigError, run_command
from .som.cli import HELP as SOM_HELP, add_som_arguments, run_som


# -- train -------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML/JSON config file or a bundled config name "
                                    "(cifar10-ema, cifar10-ksom-hard, ...); default with --resume: OUT/config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set quantizer.neighborhood=exponential --set train.lr=3e-4 "
                        "(dotted path; quantizer.X means model.quantizer.X; a bare train/data/model key works too)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--resume-from", choices=("last", "previous"), default="last",
                   help="with --resume: continue from checkpoints/last.pt (default) or from its predecessor "
                        "last.prev.pt (when last.pt is damaged)")
    p.add_argument("--data-dir", help="where the dataset lives (overrides data.data_dir)")


def run_train(args) -> int:
    from .training import TrainingInterrupted, apply_overrides, load_config_file, train

    if args.config is None:
        if not (args.resume and args.out and (Path(args.out) / "config.json").is_file()):
            raise ConfigError("--config is required (a file or a bundled config name), "
                              "except with --resume --out RUN_DIR of an existing run")
        config = load_config_file(Path(args.out) / "config.json")
        name = Path(args.out).name
    else:
        config = load_config_file(args.config)
        name = Path(args.config).stem
        if name == "config":  # a run's config.json: rerun it beside the original
            name = Path(args.config).resolve().parent.name + "-rerun"
    config = apply_overrides(config, args.set)
    if args.data_dir:
        config.setdefault("data", {})["data_dir"] = args.data_dir
    out = Path(args.out) if args.out else Path("runs") / name
    try:
        summary = train(config, out, resume=args.resume, resume_from=args.resume_from)
    except TrainingInterrupted as e:
        print(f"kohonen-vae train: {e}", file=sys.stderr)
        return 128 + e.signal_number
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (the process group is gone by now)
        print(f"done: {summary['steps']} steps, best validation MSE {_fmt(summary['best_val_recon'], '.5f')} "
              f"at step {summary['best_step']}, +10% at step {summary['converge_10_step']}, "
              f"+20% at step {summary['converge_20_step']}"
              + (f", test MSE {summary['test']['recon']:.5f}" if summary.get("test") else ""))
        print(f"outputs: {out}/ (config.json, metrics.jsonl, summary.json, checkpoints/)")
        if json.loads((out / "config.json").read_text())["train"]["report"]:
            _write_run_report(out)
    return 0


def _write_run_report(run_dir: Path) -> None:
    """``run_dir/report.html`` after training (train.report = true). The run is complete and saved either
    way, so a failure here is a warning with the command that retries it, not an error."""
    try:
        path = report.write_report([run_dir], run_dir / "report.html")
        print(f"report: {path}")
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"warning: could not write the report of {run_dir}: {type(e).__name__}: {e}. "
              f"Retry with: kohonen-vae report {run_dir}", file=sys.stderr)


# -- demo --------------------------------------------------------------------------------------------------
DEMO_METHODS = {
    "ema": ("EMA-VQ", {"type": "ema"}),
    "ksom-hard": ("KSOM-hard", {"type": "ksom", "neighborhood": "hard", "shrink": 0.1}),
}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="a new or empty folder for the two runs and the report "
                                               "(default: runs/demo, or runs/demo-2, -3 ... if that exists)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo config")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report comparing the two runs")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def demo_folder(out: str | None) -> Path:
    """Where the demo writes: ``out`` if it is new or an empty folder (anything else is refused: the demo
    never deletes or overwrites files), else the first of runs/demo, runs/demo-2, ... that does not exist."""
    if out is not None:
        parent = Path(out)
        if parent.exists() and (not parent.is_dir() or any(parent.iterdir())):
            raise ConfigError(f"--out {parent} exists and is not an empty folder; the demo writes two new runs and a "
                              "report only into a new or empty folder (nothing is deleted): choose another --out")
        return parent
    parent, k = Path("runs") / "demo", 1
    while parent.exists():
        k += 1
        parent = Path("runs") / f"demo-{k}"
    return parent


def run_demo(args) -> int:
    from .training import apply_overrides, load_config_file, train

    base = load_config_file("demo")
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
        t = base["train"]
        t["max_steps"] = args.steps
        t["eval_every"] = min(t["eval_every"], args.steps)
        t["checkpoint_every"] = min(t["checkpoint_every"], args.steps)
        t["log_every"] = min(t["log_every"], args.steps)
    base = apply_overrides(base, args.set)
    parent = demo_folder(args.out)
    rows = []
    t0 = time.perf_counter()
    for key, (label, qcfg) in DEMO_METHODS.items():
        cfg = json.loads(json.dumps(base))
        cfg["model"]["quantizer"] = {**cfg["model"].get("quantizer", {}), **qcfg}
        cfg["train"]["report"] = False  # one report comparing both runs is written below instead
        run_dir = parent / key
        print(f"[{label}] training {cfg['train']['max_steps']} steps -> {run_dir}", flush=True)
        summary = train(cfg, run_dir)
        rows.append((label, summary, _median_step_time(run_dir)))
    print()
    print(format_comparison(rows))
    report_path = None
    if not args.no_report:
        report_path = report.write_report([parent / k for k in DEMO_METHODS], parent / "report.html")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s. Outputs: " + ", ".join(str(parent / k) for k in DEMO_METHODS)
          + " (config.json, metrics.jsonl, summary.json, checkpoints/)"
          + (f"; comparison report: {report_path}" if report_path else ""))
    return 0


def _median_step_time(run_dir: Path) -> float | None:
    """Median over the run's logging windows of the mean training-step time (seconds): robust to a burst
    of other work on the machine during one window, unlike the run's total wall time."""
    from .training import read_metrics

    times = [r["step_time_s"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    return statistics.median(times) if times else None


def format_comparison(rows) -> str:
    """Plain-text table of ``[(label, summary, median step seconds), ...]``; the first row is the reference
    whose best validation MSE defines the common threshold of "steps to reach EMA-VQ's best"."""
    # the early comparison point: the evaluation closest to a quarter of the run (KSOM's advantage is early)
    steps = sorted({e[0] for _, s, _ in rows for e in s.get("evals", [])})
    early = min(steps, key=lambda st: abs(st - steps[-1] / 4)) if steps else None
    reference = rows[0][1].get("best_val_recon") if rows else None
    header = ("method", f"val MSE @{early}", "best val MSE", "at step", f"to {rows[0][0]}'s best" if rows else "",
              "+20% step", "+10% step", "perplexity", "used codes", "ms/step")
    lines = []
    for label, s, step_s in rows:
        ppl = s.get("final_perplexity") or [None]
        used = s.get("final_used_codes") or [None]
        evals = s.get("evals", [])
        at_early = next((v for st, v in evals if st == early), None)
        reach = None if reference is None else next((st for st, v in evals if v <= reference), None)
        lines.append((label, _fmt(at_early, ".4f"), _fmt(s["best_val_recon"], ".4f"), str(s["best_step"]),
                      "never" if reach is None and reference is not None else str(reach),
                      str(s["converge_20_step"]), str(s["converge_10_step"]), " / ".join(_fmt(p, ".1f") for p in ppl),
                      " / ".join(str(u) for u in used), _fmt(None if step_s is None else 1000 * step_s, ".0f")))
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in lines]
    out.append(f"validation MSE in normalised pixel units; \"to {rows[0][0] if rows else ''}'s best\": first evaluation "
               "at or below the reference run's best validation MSE (one common threshold);\n+20%/+10%: first evaluation "
               "within 20%/10% of the run's own best (the paper's metric, which flatters a run that stalls early);\n"
               "perplexity and used codes: the final model on the validation images; ms/step: median training-step "
               "time over the logging windows")
    return "\n".join(out)


# -- cache ---------------------------------------------------------------------------------------------------
def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--clear", action="store_true", help="delete every cache entry (datasets are decoded again "
                   "on their next use)")
    g.add_argument("--older-than", type=float, metavar="DAYS",
                   help="delete the entries not written or loaded for this many days")


def run_cache(args) -> int:
    import time

    from .data import cache

    folder = cache.cache_dir()
    if args.clear or args.older_than is not None:
        if args.older_than is not None and not (math.isfinite(args.older_than) and args.older_than >= 0):
            raise ConfigError(f"--older-than must be a finite number of days >= 0, got {args.older_than}")
        removed, freed = cache.remove_entries(older_than_days=None if args.clear else args.older_than)
        print(f"removed {removed} file(s), {_fmt_bytes(freed)} freed, from {folder}")
        return 0
    entries = cache.list_entries()
    print(f"cache folder: {folder} (set ${cache.ENV_CACHE} to move it)")
    if not entries:
        print("empty")
        return 0
    for e in entries:
        age_days = (time.time() - e["mtime"]) / 86400
        print(f"  {e['name']:<40} {_fmt_bytes(e['bytes']):>10}   last used {age_days:.1f} days ago")
    print(f"{len(entries)} entries, {_fmt_bytes(sum(e['bytes'] for e in entries))} in all; "
          "`kohonen-vae cache --clear` or `--older-than DAYS` removes them")
    return 0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# -- registry ----------------------------------------------------------------------------------------------
#: name -> (help, add_arguments, run)
SUBCOMMANDS = {
    "train": ("train a model from a config (TOML/JSON or bundled name)", add_train_arguments, run_train),
    "demo": ("train EMA-VQ and KSOM-hard side by side on the bundled CIFAR-10 sample and compare",
             add_demo_arguments, run_demo),
    "report": (report.HELP, report.add_arguments, report.run),
    "reproduce": (reproduce.HELP, reproduce.add_arguments, reproduce.run),
    "cache": ("list the decoded-dataset cache, or prune it (--clear, --older-than DAYS)",
              add_cache_arguments, run_cache),
    "encode": tokens.SUBCOMMANDS["encode"],
    "decode": tokens.SUBCOMMANDS["decode"],
    "export": export.SUBCOMMAND,
    "som": (SOM_HELP, add_som_arguments, run_som),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kohonen-vae", description="KSOM vector quantisation and VQ-VAEs "
                                     "(Irie, Csordas & Schmidhuber, arXiv 2302.07950)")
    parser.add_argument("--version", action="version", version=f"kohonen-vae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    """Entry point of ``kohonen-vae``; returns the exit code (0 ok, 2 usage/config/data error, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return run_command(args.command, args._run, args)


if __name__ == "__main__":
    sys.exit(main())
