"""``kohonen-vae som fit DATA.npy|DATA.csv --grid 20x20 --out DIR``: fit a :class:`KohonenMap` to a data
table and write, atomically, into DIR:

``som.npz`` + ``som.json``  the map (arrays and parameters, no pickle; ``KohonenMap.load(DIR)`` reads it)
``metrics.json``            quantisation / topographic error, usage, smoothness on the training data
``som.html``                a self-contained page: metrics, training curve, U-matrix, hit map, component planes

Files of those names that ``kohonen-vae som`` did not write are never replaced (the command stops with
an error before training); other files in DIR are left alone. Data: a 2-D numeric ``.npy`` (no pickled
objects) or a comma-separated ``.csv`` whose first line may be a header of column names.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_json, atomic_write_text
from ..errors import ConfigError
from .estimator import DECAYS, INITS, NEIGHBORHOODS, UPDATES_PER_EPOCH, WINNER_SEARCHES, KohonenMap, as_data_matrix
from .storage import GENERATOR, MAP_ARRAYS, MAP_JSON, is_ours

HELP = "fit a stand-alone self-organising map (Kohonen's batch map) to a .npy/.csv table; writes map, metrics, HTML"
METRICS_JSON = "metrics.json"
PAGE = "som.html"
OUTPUTS = (MAP_ARRAYS, MAP_JSON, METRICS_JSON, PAGE)


# -- data ---------------------------------------------------------------------------------------------
def load_table(path) -> tuple[np.ndarray, list[str] | None]:
    """``(X, column names or None)`` from a 2-D numeric ``.npy`` or a ``.csv`` (optional header line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ConfigError(f"{path} holds pickled objects or is not a .npy array ({e}); save a numeric array "
                              "with np.save(path, X.astype(np.float32))") from e
        return x, None
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
        cells = [c.strip() for c in first.split(",")]
        try:
            [float(c) for c in cells]
            header = None
        except ValueError:
            header = [c.strip('"') for c in cells]
        try:
            x = np.loadtxt(path, delimiter=",", skiprows=0 if header is None else 1, ndmin=2, dtype=np.float64,
                           encoding="utf-8-sig")
        except ValueError as e:
            raise ConfigError(f"{path} is not a numeric comma-separated table ({e}); every row needs the same "
                              "number of numeric fields (a first line of column names is allowed)") from e
        return x, header
    raise ConfigError(f"{path}: unknown data format {suffix!r}; pass a .npy array or a .csv table")


def parse_grid(text: str) -> tuple[int, ...]:
    """``"20x20"`` -> ``(20, 20)``; also ``"50"`` (1-D) and ``"8x8x8"``."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"--grid {text!r} is not a grid shape such as 20x20 (positive sizes joined by 'x')")
    return shape


def check_outputs(folder: Path) -> None:
    """Refuse (ConfigError) when ``folder`` is a file or holds an output name that is not ours."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder (new or one this command wrote before)")
    foreign = [n for n in OUTPUTS if (folder / n).exists() and not is_ours(folder / n)]
    if foreign:
        raise ConfigError(f"--out {folder} holds {', '.join(foreign)} not written by `kohonen-vae som fit`; "
                          "nothing was changed: choose another --out (or move those files away)")


# -- command ------------------------------------------------------------------------------------------
def add_som_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kohonen-vae som`` (sub-commands: ``fit``)."""
    sub = parser.add_subparsers(dest="som_command", metavar="SOM_COMMAND")
    p = sub.add_parser("fit", help="fit a map to DATA and write map, metrics and an HTML page into --out",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="a 2-D numeric .npy array or a .csv table (rows = samples)")
    p.add_argument("--grid", required=True, help="map shape, e.g. 20x20")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    p.add_argument("--updates-per-epoch", type=int, default=UPDATES_PER_EPOCH,
                   help=f"map updates per pass over the data (default {UPDATES_PER_EPOCH}; 1 = the classical "
                        "batch map)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per update (overrides --updates-per-epoch; default: rows / updates per epoch)")
    p.add_argument("--sigma", type=float, default=None, help="initial kernel width (default: half the larger side)")
    p.add_argument("--sigma-final", type=float, default=1.0, help="the floor the width shrinks towards (default 1)")
    p.add_argument("--decay", choices=DECAYS, default=DECAYS[0],
                   help=f"how the width shrinks, once per epoch (default {DECAYS[0]}: MiniSom's inverse_decay_to_one)")
    p.add_argument("--neighborhood", choices=NEIGHBORHOODS, default="gaussian", help="kernel (default gaussian)")
    p.add_argument("--topology", choices=("rectangular", "hexagonal"), default="rectangular")
    p.add_argument("--periodic", action="store_true", help="toroidal map")
    p.add_argument("--init", choices=INITS, default="pca", help="initialisation (default pca)")
    p.add_argument("--winner-search", choices=WINNER_SEARCHES, default="exact",
                   help="exact (default) or local: search each row's winner near its previous one (large maps)")
    p.add_argument("--standardize", action="store_true",
                   help="scale every column to mean 0, standard deviation 1 before fitting (the scaling is "
                        "saved in som.npz as feature_mean / feature_scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of random/sample init and mini-batch order (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: torch's default device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_som(args) -> int:
    """``kohonen-vae som ...``: dispatch to the sub-command; returns the exit code."""
    if getattr(args, "som_command", None) != "fit":
        raise ConfigError("choose a som sub-command: `kohonen-vae som fit DATA --grid 20x20 --out DIR`")
    return run_fit(args)


def run_fit(args) -> int:
    out = Path(args.out)
    check_outputs(out)  # before any work: a refused folder costs nothing
    grid = parse_grid(args.grid)
    x, names = load_table(args.data)
    data = as_data_matrix(x, f"data in {args.data}").cpu().numpy()  # checks shape, NaN, dtype
    if names is not None and len(names) != data.shape[1]:
        names = None
    extra_arrays = {}
    if args.standardize:
        mean = data.mean(0)
        scale = data.std(0)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        data = (data - mean) / scale
        extra_arrays = {"feature_mean": mean.astype(np.float32), "feature_scale": scale}
    som = KohonenMap(grid, neighborhood=args.neighborhood, sigma=args.sigma, sigma_final=args.sigma_final,
                     decay=args.decay, topology=args.topology, periodic=args.periodic, init=args.init,
                     epochs=args.epochs, batch_size=args.batch_size,
                     updates_per_epoch=args.updates_per_epoch, winner_search=args.winner_search,
                     device=args.device, seed=args.seed, progress=False if args.no_progress else None)
    t0 = time.perf_counter()
    som.fit(data)
    seconds = time.perf_counter() - t0
    metrics = {"generator": GENERATOR, "data": str(args.data), "standardized": bool(args.standardize),
               **som.evaluate(data), "fit_seconds": seconds}
    counts = som.hit_counts(data)
    command = fit_command(args)
    check_outputs(out)  # again: something may have appeared during training
    paths = som.save(out, extra_arrays=extra_arrays, extra={"data": str(args.data), "feature_names": names,
                                                            "standardized": bool(args.standardize)})
    atomic_write_json(out / METRICS_JSON, metrics)
    from .report import som_page

    shown = {k: v for k, v in metrics.items() if k != "generator"}
    notes = ["Columns were standardised (mean 0, standard deviation 1) before fitting."] if args.standardize else []
    atomic_write_text(out / PAGE, som_page(som, shown, counts, names, title=f"Self-organising map of {Path(args.data).name}",
                                           command=command, notes=notes))
    te = metrics["topographic_error"]
    print(f"fitted a {'x'.join(map(str, som.grid_.shape))} map to {data.shape[0]} rows x {data.shape[1]} features "
          f"in {seconds:.1f} s: quantisation error {metrics['quantization_error']:.4g}, topographic error "
          f"{'-' if te is None else format(te, '.4f')}, {metrics['used_units']} of {som.grid_.size} units used")
    print(f"outputs: {paths['arrays']}, {paths['json']}, {out / METRICS_JSON}, {out / PAGE}")
    return 0


def fit_command(args) -> str:
    """The ``kohonen-vae som fit`` command line that reproduces ``args`` (options at their defaults left out)."""
    parts = ["kohonen-vae", "som", "fit", str(args.data), "--grid", str(args.grid), "--out", str(args.out),
             "--epochs", str(args.epochs)]
    defaults = {"batch_size": None, "updates_per_epoch": UPDATES_PER_EPOCH, "sigma": None, "sigma_final": 1.0,
                "decay": DECAYS[0], "neighborhood": "gaussian", "topology": "rectangular", "init": "pca", "winner_search": "exact",
                "seed": 0, "device": None}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            parts += ["--" + name.replace("_", "-"), str(value)]
    parts += [f"--{flag}" for flag in ("periodic", "standardize") if getattr(args, flag)]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv=None) -> int:
    """``python -m kohonen_vae.som.cli fit ...``: the same as ``kohonen-vae som fit ...``."""
    parser = argparse.ArgumentParser(prog="kohonen-vae som", description=HELP)
    add_som_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_som(args)
    except ConfigError as e:
        print(f"kohonen-vae som: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
