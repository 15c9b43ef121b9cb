"""KohonenMap against MiniSom (and TorchSOM when installed), side by side in one run: quantisation error,
topographic error and wall time at equal epochs.

    python benchmarks/som.py --out benchmarks/results/som.md          # the full run (about half an hour on 2 busy cores)
    python benchmarks/som.py --quick                                  # digits only
    python benchmarks/som.py --quality                                # errors only, 1 thread (see below)

Data: scikit-learn's digits (1,797 x 64, a 10x10 map) and a 100,000 x 64 Gaussian mixture (20 components,
fixed seed; 50x50 and 200x200 maps). Every method starts from a PCA initialisation (each library's own)
and trains the same number of epochs; QE and TE of every result are computed by the same function
(:func:`kohonen_vae.metrics.quantization_errors`, equal to MiniSom's own, see tests/test_som.py) on the
whole training set. Times are one fit each (initialisation included), all with 2 threads
(``torch.set_num_threads(2)``, ``OMP_NUM_THREADS=2``); the machine's load average is recorded before and
after, and the ratios compare runs made minutes apart in the same process.

Methods:

* ``KohonenMap`` (this library) with its defaults and ``seed=0`` (the order of the rows): PCA init,
  gaussian kernel, width from half the larger side towards 1 (``inverse``, changed once per epoch), 4
  updates per epoch on running statistics, exact winner search; and on the mixture the same with
  ``winner_search="local"`` (maps below 1,024 units always search exactly).
* ``MiniSom.train_batch_offline``, MiniSom's implementation of Kohonen's batch map, with the settings that
  make it that algorithm and match ours: ``pca_weights_init``, ``sigma`` = half the larger side,
  ``sigma_decay_function="inverse_decay_to_one"`` (its docs' choice to decay to 1), ``learning_rate=1``
  held constant (the batch map has no learning rate; MiniSom blends ``(1 - lr) w + lr w_batch``).
* ``MiniSom.train`` (its classical online SOM; ``train_batch`` is the same, sequential), with its defaults
  (sigma 1, learning rate 0.5, asymptotic decay), ``random_order=True, use_epochs=True``: digits only
  (at 100,000 samples one epoch costs about as much as one of ``train_batch_offline``).
* TorchSOM ``SOM.fit`` (mini-batch online rule with a learning rate): PCA init, sigma = half the larger
  side with ``sig_inverse_decay_to_one``, other settings its defaults except the batch size: 64 on digits
  and 256 on the mixture (its default of 5 took 442 s for the 20 digits epochs on the busy machine: it
  computes QE and TE of every batch). Skipped at 200x200: it precomputes K x K coordinate differences (12.8 GB).

At 200x200 MiniSom is timed on the first ``--minisom-probe`` samples of one epoch and extrapolated to the
full run (clearly labelled); its errors are not measured there.

``--quality`` measures errors only (no times; one thread, so it can run beside other work): every case
starts from the *same* PCA initialisation (this library's, :func:`kohonen_vae.som.pca_codebook`, given to
MiniSom as its weights) and also lists MiniSom from its own ``pca_weights_init`` (the timed run's setting).
KohonenMap runs with ``--seeds`` orders of the rows (its only randomness), plus one update per epoch (the
classical batch map with the same widths). Cases: digits 10x10 at 20 and 100 epochs (does the topographic
error stay low the longer the map trains?), the mixture at 50x50 for 5 epochs on the ``--data-seeds``
mixtures, and with ``--quality-200`` the 200x200 map for 5 epochs. MiniSom's batch map at 200x200 would
take hours (its loop is per sample); there it is :func:`minisom_batch_formula`, MiniSom's
``train_batch_offline`` update re-implemented in float64 torch, whose weights the run first checks against
MiniSom's own on digits.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kohonen_vae.fileio import atomic_write_text  # noqa: E402
from kohonen_vae.geometry import Grid  # noqa: E402
from kohonen_vae.metrics import quantization_errors  # noqa: E402
from kohonen_vae.som import KohonenMap  # noqa: E402


def mixture(n=100_000, d=64, components=20, seed=0) -> np.ndarray:
    """``n`` x ``d`` float32 rows from ``components`` Gaussians (centres N(0, 16 I), per-component scale
    0.5-1.5), fixed seed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (components, d)) * 4
    scales = rng.uniform(0.5, 1.5, components)
    label = rng.integers(0, components, n)
    return (centres[label] + rng.normal(0, 1, (n, d)) * scales[label, None]).astype(np.float32)


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def errors(x: np.ndarray, codebook: np.ndarray, shape) -> tuple[float, float]:
    """(QE, TE) of a (K, D) codebook in the library's unit order, on all rows of x."""
    m = quantization_errors(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32)),
                            Grid(shape))
    return m["quantization_error"], m["topographic_error"]


def from_xy(weights: np.ndarray) -> np.ndarray:
    """MiniSom/TorchSOM weights[i, j] (unit at grid coordinates (i, j)) -> our (K, D), unit i + s0 j."""
    return np.asarray(weights).transpose(1, 0, 2).reshape(-1, weights.shape[-1])


# ---------------------------------------------------------------------------------------------- methods
def run_kohonen(x, shape, epochs, **kwargs):
    som = KohonenMap(shape, progress=False, **{"seed": 0, **kwargs})
    t0 = time.perf_counter()
    som.fit(x, epochs=epochs)
    seconds = time.perf_counter() - t0
    return seconds, som.codebook_.numpy()


def minisom_batch(x, shape, epochs, samples=None):
    from minisom import MiniSom

    sigma = max(shape) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sigma might be too high" is not true of a batch map
        som = MiniSom(shape[0], shape[1], x.shape[1], sigma=sigma, learning_rate=1.0,
                      decay_function=lambda lr, t, max_iter: lr, sigma_decay_function="inverse_decay_to_one",
                      neighborhood_function="gaussian", random_seed=0)
    t0 = time.perf_counter()
    som.pca_weights_init(x)
    som.train_batch_offline(x if samples is None else x[:samples], epochs if samples is None else 1)
    seconds = time.perf_counter() - t0
    return seconds, from_xy(som.get_weights())


def minisom_online(x, shape, epochs):
    from minisom import MiniSom

    som = MiniSom(shape[0], shape[1], x.shape[1], random_seed=0)
    t0 = time.perf_counter()
    som.pca_weights_init(x)
    som.train(x, epochs, random_order=True, use_epochs=True)
    seconds = time.perf_counter() - t0
    return seconds, from_xy(som.get_weights())


def torchsom_fit(x, shape, epochs, batch_size):
    from torchsom.core import SOM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        som = SOM(x=shape[0], y=shape[1], num_features=x.shape[1], epochs=epochs, batch_size=batch_size,
                  sigma=max(shape) / 2, sigma_decay_function="sig_inverse_decay_to_one", device="cpu",
                  random_seed=0, search_backend="torch")
    data = torch.from_numpy(x)
    t0 = time.perf_counter()
    som.initialize_weights(data, mode="pca")
    som.fit(data, verbose=False)
    seconds = time.perf_counter() - t0
    return seconds, from_xy(som.weights.detach().numpy())


# ------------------------------------------------------------------------------------------------ quality
MINISOM_BATCH = "MiniSom train_batch_offline"


def minisom_on_init(x, shape, epochs, init=None) -> np.ndarray:
    """MiniSom's batch map as in :func:`minisom_batch`, from ``init`` (our (K, D) unit order) or, if None,
    from its own ``pca_weights_init``; returns the trained (K, D) codebook in our order."""
    from minisom import MiniSom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        som = MiniSom(shape[0], shape[1], x.shape[1], sigma=max(shape) / 2, learning_rate=1.0,
                      decay_function=lambda lr, t, max_iter: lr, sigma_decay_function="inverse_decay_to_one",
                      neighborhood_function="gaussian", random_seed=0)
    if init is None:
        som.pca_weights_init(x)
    else:  # our unit i + s0 j is MiniSom's weights[i, j]
        som._weights = np.asarray(init, np.float64).reshape(shape[1], shape[0], -1).transpose(1, 0, 2).copy()
    som.train_batch_offline(x, epochs)
    return from_xy(som.get_weights()).astype(np.float32)


def minisom_batch_formula(x, shape, epochs, init) -> np.ndarray:
    """MiniSom's ``train_batch_offline`` (learning rate 1, gaussian, ``inverse_decay_to_one``) written out in
    float64 torch: per epoch t, ``sigma = sigma0 / (1 + t (sigma0 - 1) / epochs)``, every row's winner, then
    ``w_k = sum_j g(k, c(j)) x_j / sum_j g(k, c(j))`` where that denominator is > 0, with MiniSom's
    untruncated ``g = exp(-di^2 / 2 sigma^2) exp(-dj^2 / 2 sigma^2)`` applied one grid axis at a time."""
    s0, s1 = shape
    sigma0 = max(shape) / 2
    data = torch.from_numpy(np.ascontiguousarray(x)).double()
    w = torch.from_numpy(np.asarray(init)).double().clone()
    k = s0 * s1
    a0, a1 = torch.arange(s0).double(), torch.arange(s1).double()
    for t in range(epochs):
        sigma = sigma0 / (1 + t * (sigma0 - 1) / epochs)
        w_sq = w.square().sum(1)
        winners = torch.cat([torch.addmm(w_sq, data[i:i + 2048], w.t(), alpha=-2.0).argmin(1)
                             for i in range(0, len(data), 2048)])
        stats = torch.zeros(k, 1 + data.shape[1], dtype=torch.float64)
        stats.index_add_(0, winners, torch.cat([torch.ones(len(data), 1, dtype=torch.float64), data], 1))
        stats = stats.reshape(s1, s0, -1)  # [j, i]: unit i + s0 j
        g0 = torch.exp(-(a0[:, None] - a0[None]) ** 2 / (2 * sigma ** 2))
        g1 = torch.exp(-(a1[:, None] - a1[None]) ** 2 / (2 * sigma ** 2))
        smoothed = torch.einsum("ia,bac->bic", g0, stats)
        smoothed = torch.einsum("jb,bic->jic", g1, smoothed).reshape(k, -1)
        hit = smoothed[:, 0] > 0
        w[hit] = smoothed[hit, 1:] / smoothed[hit, :1]
    return w.float().numpy()


def quality_case(name, x, shape, epochs, seeds, rows, minisom_own=True, formula=False):
    """Rows of (case, method, epochs, QE, TE) for one data set and map, all from the same PCA init."""
    label = f"{name} {shape[0]}x{shape[1]}"
    print(f"\n## {label}, {x.shape[0]:,} x {x.shape[1]}, {epochs} epochs", flush=True)
    init = pca_codebook_np(x, shape)

    def add(method, codebook):
        qe, te = errors(x, codebook, shape)
        rows.append(dict(case=label, epochs=epochs, method=method, qe=qe, te=te))
        print(f"  {method}: QE {qe:.4f}, TE {te:.4f}", flush=True)

    if formula:
        add(f"{MINISOM_BATCH} formula (same init)", minisom_batch_formula(x, shape, epochs, init))
    else:
        add(f"{MINISOM_BATCH} (same init)", minisom_on_init(x, shape, epochs, init))
        if minisom_own:
            add(f"{MINISOM_BATCH} (its own pca_weights_init)", minisom_on_init(x, shape, epochs))
    for seed in seeds:
        som = KohonenMap(shape, init=init, seed=seed, progress=False).fit(x, epochs=epochs)
        add(f"KohonenMap defaults, seed {seed}", som.codebook_.numpy())
    som = KohonenMap(shape, init=init, updates_per_epoch=1, progress=False).fit(x, epochs=epochs)
    add("KohonenMap updates_per_epoch=1 (classical batch map)", som.codebook_.numpy())


def quality_table(rows) -> str:
    """Markdown: every row with its ratios to MiniSom's batch map from the same init, and per case the
    mean and range of KohonenMap's seeds."""
    lines = ["| case | epochs | method | QE | TE | QE / MiniSom (same init) | TE / MiniSom (same init) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["epochs"]), []).append(r)
    for (case, epochs), group in groups.items():
        ref = next(r for r in group if r["method"].startswith(MINISOM_BATCH) and "same init" in r["method"])
        for r in group:
            lines.append(f"| {case} | {epochs} | {r['method']} | {r['qe']:.4f} | {r['te']:.4f} | "
                         f"{r['qe'] / ref['qe']:.3f} | {r['te'] / ref['te']:.3f} |")
        seeded = [r for r in group if "seed" in r["method"]]
        if len(seeded) > 1:
            q = np.array([r["qe"] / ref["qe"] for r in seeded])
            t = np.array([r["te"] / ref["te"] for r in seeded])
            lines.append(f"| {case} | {epochs} | KohonenMap defaults, mean of {len(seeded)} seeds "
                         f"(min-max) | {np.mean([r['qe'] for r in seeded]):.4f} | "
                         f"{np.mean([r['te'] for r in seeded]):.4f} | **{q.mean():.3f}** ({q.min():.3f}-{q.max():.3f}) "
                         f"| **{t.mean():.3f}** ({t.min():.3f}-{t.max():.3f}) |")
    return "\n".join(lines)


def run_quality(args) -> int:
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    rows: list[dict] = []
    x = digits()
    check = minisom_batch_formula(x, (10, 10), 5, pca_codebook_np(x, (10, 10)))
    same = minisom_on_init(x, (10, 10), 5, pca_codebook_np(x, (10, 10)))
    gap = float(np.abs(check - same).max())
    print(f"minisom_batch_formula vs MiniSom on digits, 5 epochs: max |difference| of the weights {gap:.2e}")
    for epochs in (args.epochs_digits, 100):
        quality_case("digits", x, (10, 10), epochs, seeds, rows)
    for data_seed in [] if args.quick else args.data_seeds:
        x = mixture(seed=data_seed)
        quality_case(f"mixture (data seed {data_seed})", x, (50, 50), args.epochs_mixture, seeds, rows,
                     minisom_own=data_seed == 0)
    if args.quality_200 and not args.quick:
        x = mixture()
        quality_case("mixture (data seed 0)", x, (200, 200), args.epochs_mixture, range(1), rows, formula=True)
    text = "\n".join([
        "# KohonenMap vs MiniSom's batch map: errors at equal epochs (quality only, no times)",
        "",
        f"Command: `python benchmarks/som.py --quality{' --quick' if args.quick else ''} --seeds {args.seeds} --data-seeds "
        f"{' '.join(map(str, args.data_seeds))}{' --quality-200' if args.quality_200 else ''}"
        f"{' --out ' + args.out if args.out else ''}` (1 thread; torch {torch.__version__}).",
        f"MiniSom's batch-map formula re-implemented (used at 200x200 only) vs MiniSom on digits: max weight "
        f"difference {gap:.1e}.",
        "",
        quality_table(rows),
    ]) + "\n"
    print("\n" + text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


def pca_codebook_np(x, shape) -> np.ndarray:
    from kohonen_vae.som import pca_codebook

    return pca_codebook(torch.from_numpy(x), Grid(shape)).numpy()


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------------ runner
def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_case(name, x, shape, epochs, methods, rows):
    print(f"\n## {name}: {x.shape[0]:,} x {x.shape[1]}, {shape[0]}x{shape[1]} map, {epochs} epochs", flush=True)
    for label, fn, note in methods:
        print(f"  {label} ...", end="", flush=True)
        out = fn()
        if out is None:
            print(" skipped")
            continue
        seconds, codebook, measured = out
        qe, te = errors(x, codebook, shape) if measured else (None, None)
        rows.append(dict(case=name, map=f"{shape[0]}x{shape[1]}", method=label, epochs=epochs, qe=qe, te=te,
                         seconds=seconds, note=note))
        print(f" {seconds:.1f} s" + (f", QE {qe:.4f}, TE {te:.4f}" if measured else ""), flush=True)


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(rows) -> str:
    lines = ["| data | map | method | epochs | QE | TE | QE / MiniSom batch | TE / MiniSom batch | time | "
             "MiniSom batch time / this |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = next((q for q in rows if (q["case"], q["map"]) == (r["case"], r["map"])
                    and q["method"].startswith("MiniSom train_batch_offline")), None)
        qe_ratio = r["qe"] / ref["qe"] if ref and ref["qe"] and r["qe"] is not None else None
        te_ratio = r["te"] / ref["te"] if ref and ref["te"] and r["te"] is not None else None
        speed = ref["seconds"] / r["seconds"] if ref else None
        lines.append(f"| {r['case']} | {r['map']} | {r['method']}{(' ' + r['note']) if r['note'] else ''} | "
                     f"{r['epochs']} | {fmt(r['qe'], '.4f')} | {fmt(r['te'], '.4f')} | {fmt(qe_ratio, '.3f')} | "
                     f"{fmt(te_ratio, '.3f')} | {r['seconds']:.1f} s | {fmt(speed, '.1f')}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown results here (e.g. benchmarks/results/som.md)")
    ap.add_argument("--quick", action="store_true", help="digits only (also with --quality)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs-digits", type=int, default=20)
    ap.add_argument("--epochs-mixture", type=int, default=5)
    ap.add_argument("--minisom-probe", type=int, default=200,
                    help="samples of one epoch MiniSom is timed on at 200x200 (then extrapolated)")
    ap.add_argument("--exact-200", action="store_true",
                    help="also run the exact winner search at 200x200 (several minutes per epoch on 2 busy cores)")
    ap.add_argument("--quality", action="store_true",
                    help="errors only (1 thread, no times): same init for all, several seeds (module docstring)")
    ap.add_argument("--seeds", type=int, default=5, help="--quality: KohonenMap row orders (seeds 0..N-1)")
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0], help="--quality: mixtures to draw")
    ap.add_argument("--quality-200", action="store_true", help="--quality: also the 200x200 map (about 10 minutes)")
    args = ap.parse_args(argv)
    if args.quality:
        return run_quality(args)
    torch.set_num_threads(args.threads)
    has_minisom, has_torchsom = available("minisom"), available("torchsom")
    before = load()
    print(f"load before: {before}")
    rows: list[dict] = []

    def ours(x, shape, epochs, **kw):
        return lambda: (*run_kohonen(x, shape, epochs, **kw), True)

    def ms_batch(x, shape, epochs):
        return (lambda: (*minisom_batch(x, shape, epochs), True)) if has_minisom else (lambda: None)

    x = digits()
    e = args.epochs_digits
    bench_case("digits", x, (10, 10), e, [
        ("KohonenMap (defaults)", ours(x, (10, 10), e), ""),
                ("MiniSom train_batch_offline", ms_batch(x, (10, 10), e), "(batch map, sigma 5 -> 1, lr 1)"),
        ("MiniSom train", (lambda: (*minisom_online(x, (10, 10), e), True)) if has_minisom else (lambda: None),
         "(online, defaults: sigma 1, lr 0.5)"),
        ("TorchSOM fit", (lambda: (*torchsom_fit(x, (10, 10), e, 64), True)) if has_torchsom else (lambda: None),
         "(batch 64, sigma 5 -> 1, lr 0.5)"),
    ], rows)
    if not args.quick:
        x = mixture()
        e = args.epochs_mixture
        bench_case("mixture", x, (50, 50), e, [
            ("KohonenMap (defaults)", ours(x, (50, 50), e), ""),
            ("KohonenMap winner_search=local", ours(x, (50, 50), e, winner_search="local"), ""),
            ("MiniSom train_batch_offline", ms_batch(x, (50, 50), e), "(batch map, sigma 25 -> 1, lr 1)"),
            ("TorchSOM fit", (lambda: (*torchsom_fit(x, (50, 50), e, 256), True)) if has_torchsom else (lambda: None),
             "(batch 256, sigma 25 -> 1, lr 0.5)"),
        ], rows)
        probe = args.minisom_probe

        def minisom_extrapolated():
            if not has_minisom:
                return None
            seconds, codebook = minisom_batch(x, (200, 200), e, samples=probe)
            return seconds * (x.shape[0] / probe) * e, codebook, False

        bench_case("mixture", x, (200, 200), e, [
            ("KohonenMap winner_search=local", ours(x, (200, 200), e, winner_search="local"), ""),
            ("KohonenMap (defaults)", ours(x, (200, 200), e) if args.exact_200 else (lambda: None), ""),
            ("MiniSom train_batch_offline", minisom_extrapolated,
             f"(EXTRAPOLATED from {probe} samples of one epoch; errors not measured)"),
        ], rows)
    after = load()
    print(f"load after: {after}")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for mod in ("minisom", "torchsom", "sklearn"):
        if available(mod):
            from importlib.metadata import version

            dist = {"sklearn": "scikit-learn", "minisom": "MiniSom"}.get(mod, mod)
            versions.append(f"{dist} {version(dist)}")
    text = "\n".join([
        "# KohonenMap vs MiniSom / TorchSOM",
        "",
        f"Command: `python benchmarks/som.py{' --quick' if args.quick else ''}"
        f"{' --out ' + args.out if args.out else ''}` ({', '.join(versions)}; CPU: {cpu}, "
        f"{args.threads} threads).",
        "",
        f"Load before: `{before}`  ",
        f"Load after: `{after}`",
        "",
        table(rows),
        "",
        "QE: mean distance of a row to its best-matching unit; TE: share of rows whose two best units are not "
        "grid neighbours; both on the whole training set, by the same function for every method. Ratios are "
        "against MiniSom's batch map on the same data and map.",
    ]) + "\n"
    print("\n" + text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
