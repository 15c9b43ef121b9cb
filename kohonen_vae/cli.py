"""Command line: ``kohonen-vae <subcommand>`` (also ``python -m kohonen_vae``).

Subcommands live in :data:`SUBCOMMANDS` as ``name -> (help, add_arguments(parser), run(args) -> exit code)``;
adding one is adding an entry (``report`` and ``reproduce`` are registered there by the report module).

Expected problems (bad config, missing dataset, run that cannot be resumed) reach the user as one
``error:`` message without a traceback and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .models.factory import ConfigError


# -- train -------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML/JSON config file or a bundled config name "
                                    "(cifar10-ema, cifar10-ksom-hard, ...); default with --resume: OUT/config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set quantizer.neighborhood=exponential --set train.lr=3e-4 "
                        "(dotted path; quantizer.X means model.quantizer.X; a bare train/data/model key works too)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--data-dir", help="where the dataset lives (overrides data.data_dir)")


def run_train(args) -> int:
    from .training import apply_overrides, load_config_file, train

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
    _enable_training_report()
    summary = train(config, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (the process group is gone by now)
        print(f"done: {summary['steps']} steps, best validation MSE {_fmt(summary['best_val_recon'], '.5f')} "
              f"at step {summary['best_step']}, +10% at step {summary['converge_10_step']}, "
              f"+20% at step {summary['converge_20_step']}"
              + (f", test MSE {summary['test']['recon']:.5f}" if summary.get("test") else ""))
        print(f"outputs: {out}/ (config.json, metrics.jsonl, summary.json, checkpoints/)")
    return 0


# -- demo --------------------------------------------------------------------------------------------------
DEMO_METHODS = {
    "ema": ("EMA-VQ", {"type": "ema"}),
    "ksom-hard": ("KSOM-hard", {"type": "ksom", "neighborhood": "hard", "shrink": 0.1}),
}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="parent folder of the two runs (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo config")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report comparing the two runs")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


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
    parent = Path(args.out)
    rows = []
    t0 = time.perf_counter()
    for key, (label, qcfg) in DEMO_METHODS.items():
        cfg = json.loads(json.dumps(base))
        cfg["model"]["quantizer"] = {**cfg["model"].get("quantizer", {}), **qcfg}
        cfg["train"]["report"] = False  # one report comparing both runs is written below instead
        run_dir = parent / key
        if (run_dir / "config.json").is_file():  # a previous demo's output: start over
            shutil.rmtree(run_dir)
        print(f"[{label}] training {cfg['train']['max_steps']} steps -> {run_dir}", flush=True)
        t_run = time.perf_counter()
        summary = train(cfg, run_dir)
        rows.append((label, summary, time.perf_counter() - t_run))
    print()
    print(format_comparison(rows))
    report_path = None
    if not args.no_report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            report_path = write_report([parent / k for k in DEMO_METHODS], parent / "report.html")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s. Outputs: " + ", ".join(str(parent / k) for k in DEMO_METHODS)
          + " (config.json, metrics.jsonl, summary.json, checkpoints/)"
          + (f"; comparison report: {report_path}" if report_path else ""))
    return 0


def format_comparison(rows) -> str:
    """Plain-text table of ``[(label, summary, seconds), ...]``."""
    # the early comparison point: the evaluation closest to a quarter of the run (KSOM's advantage is early)
    steps = sorted({e[0] for _, s, _ in rows for e in s.get("evals", [])})
    early = min(steps, key=lambda st: abs(st - steps[-1] / 4)) if steps else None
    header = ("method", f"val MSE @{early}", "best val MSE", "at step", "+20% step", "+10% step", "perplexity",
              "used codes", "time")
    lines = []
    for label, s, secs in rows:
        ppl = s.get("final_perplexity") or [None]
        used = s.get("final_used_codes") or [None]
        at_early = next((v for st, v in s.get("evals", []) if st == early), None)
        lines.append((label, _fmt(at_early, ".4f"), _fmt(s["best_val_recon"], ".4f"), str(s["best_step"]),
                      str(s["converge_20_step"]), str(s["converge_10_step"]), " / ".join(_fmt(p, ".1f") for p in ppl),
                      " / ".join(str(u) for u in used), f"{secs:.0f} s"))
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in lines]
    out.append("validation MSE in normalised pixel units; +20%/+10%: first evaluation within 20%/10% of the run's "
               "own best (the paper's convergence metric);\nperplexity and used codes: the final model on the "
               "validation images")
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
        if args.older_than is not None and args.older_than < 0:
            raise ConfigError(f"--older-than must be >= 0 days, got {args.older_than}")
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
#: name -> (help, add_arguments, run). REPORT HOOK: the report module adds "report" and "reproduce" here.
SUBCOMMANDS = {
    "train": ("train a model from a config (TOML/JSON or bundled name)", add_train_arguments, run_train),
    "demo": ("train EMA-VQ and KSOM-hard side by side on the bundled CIFAR-10 sample and compare",
             add_demo_arguments, run_demo),
    "cache": ("list the decoded-dataset cache, or prune it (--clear, --older-than DAYS)",
              add_cache_arguments, run_cache),
}


def _register_optional_subcommands() -> None:
    """REPORT HOOK: ``report`` and ``reproduce`` come from their modules' ``SUBCOMMAND`` entries."""
    import importlib

    for name in ("report", "reproduce"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            continue
        entry = getattr(module, "SUBCOMMAND", None)
        if entry is not None:
            SUBCOMMANDS.setdefault(name, entry)


def _enable_training_report() -> None:
    """REPORT HOOK: ``kohonen-vae train`` writes run/report.html at the end (unless train.report = false)."""
    try:
        from .report import enable_training_report
    except ImportError:
        return
    enable_training_report()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    _register_optional_subcommands()
    parser = argparse.ArgumentParser(prog="kohonen-vae", description="KSOM vector quantisation and VQ-VAEs "
                                     "(Irie, Csordas & Schmidhuber, arXiv 2302.07950)")
    parser.add_argument("--version", action="version", version=f"kohonen-vae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _expected_errors() -> tuple:
    from .data import DatasetNotFoundError

    return (ConfigError, DatasetNotFoundError)


def main(argv=None) -> int:
    """Entry point of ``kohonen-vae``; returns the exit code (0 ok, 2 usage/config/data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except _expected_errors() as e:
        print(f"kohonen-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kohonen-vae {args.command}: interrupted (checkpoints/last.pt holds the last saved state; "
              "continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
