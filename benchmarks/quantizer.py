"""Speed and memory of one training forward of the quantisers, side by side, and of one VQ-VAE step.

    python benchmarks/quantizer.py --out docs/benchmark-quantizer.md          # the full run
    python benchmarks/quantizer.py --quick                                    # a smoke run (K = 512)

Table 1: one training forward of N = 16,384 vectors of D = 64 for K in {512, 4096, 16384, 65536}:

* ``floor``: the bare distances + argmin, ``argmin_k (||e_k||^2 - 2 z . e_k)`` with one ``addmm``;
* ``KohonenQuantizer`` with the ``none`` (EMA-VQ), ``hard``, ``exponential`` and ``gaussian`` kernels;
* ``dense``: the same KSOM update as the authors' implementation computes it, one-hot ``(N x K) @ P_t``
  ``(K x K)`` (hard kernel; the cost does not depend on the kernel since P_t is dense);
* ``VectorQuantize`` of vector-quantize-pytorch (EMA, decay 0.99, rotation trick and k-means init off),
  when it is installed (``pip install -e .[bench]``).

Times are medians over rounds; in each round every method runs once, so slow drifts of a shared machine
hit all of them alike and the ratios to the floor (measured in the same rounds) are what count. Every
forward starts at the same schedule step (``--step``, default 0: the widest kernels, the costliest step).

Peak memory: each configuration runs in a fresh subprocess, which reports its ``ru_maxrss`` after two
forwards minus its ``ru_maxrss`` after imports and input creation (or ``torch.cuda.max_memory_allocated``
on a GPU).

Table 2: one CIFAR-10 VQ-VAE training step at batch 256 (forward, backward, AdamW step with gradient
clipping, quantiser update), EMA-VQ vs KSOM-hard, with random images, built by
``kohonen_vae.models.build_model``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kohonen_vae
from kohonen_vae import KohonenQuantizer
from kohonen_vae.geometry import Grid
from kohonen_vae.neighborhood import make_neighborhood
from kohonen_vae.quantizers.base import CPU_BLOCK_ELEMENTS, DISTANCE_CHUNK_ELEMENTS, nearest_codes

N_DEFAULT, D_DEFAULT = 16384, 64
KS_DEFAULT = (512, 4096, 16384, 65536)
KERNELS = ("none", "hard", "exponential", "gaussian")
#: the floor computes the distances unchunked up to this many elements (1 GiB), in such chunks beyond
FLOOR_CHUNK_ELEMENTS = 1 << 28
#: the dense (one-hot @ P) formulation needs ~5 N K + 3 K^2 floats; it is skipped beyond this many bytes
DENSE_MAX_BYTES = 8 << 30
#: VectorQuantize holds a few N x K float matrices; skipped beyond this many bytes of N x K x 4
VQ_MAX_BYTES = 3 << 30


# ------------------------------------------------------------------------------------------- methods
def floor_assign(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The floor: argmin_k ||e_k||^2 - 2 z.e_k, one addmm per 1 GiB chunk of the N x K matrix."""
    with torch.no_grad():
        e_sq = e.square().sum(1)
        rows = max(1, FLOOR_CHUNK_ELEMENTS // e.shape[0])
        if rows >= z.shape[0]:
            return torch.addmm(e_sq, z, e.t(), alpha=-2.0).argmin(1)
        return torch.cat([torch.addmm(e_sq, z[i:i + rows], e.t(), alpha=-2.0).argmin(1)
                          for i in range(0, z.shape[0], rows)])


class DenseKSOM(nn.Module):
    """The KSOM update as the authors' reference computes it: full N x K distances, one-hot encodings,
    ``encodings @ P_t`` (N x K @ K x K), then counts = column sums and sums = (encodings @ P_t)^T z."""

    def __init__(self, dim: int, codebook_size: int, neighborhood: str = "hard", decay: float = 0.99,
                 eps: float = 1e-5):
        super().__init__()
        self.k, self.decay, self.eps = codebook_size, decay, eps
        self.neighborhood = make_neighborhood(neighborhood)
        coords = Grid.auto(codebook_size, 2).coords().float()
        self.register_buffer("grid_distance", torch.cdist(coords, coords))  # cached, (K, K)
        e = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", e)
        self.register_buffer("embed_sum", e.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.step = 0

    def forward(self, z: torch.Tensor):
        e = self.codebook
        with torch.no_grad():
            zd = z.detach()
            dist = zd.square().sum(1, keepdim=True) + e.square().sum(1) - 2.0 * zd @ e.t()
            indices = dist.argmin(1)
            del dist
            onehot = F.one_hot(indices, self.k).float()
            q = onehot @ e
        loss = 0.25 * F.mse_loss(z, q)
        if self.training:
            with torch.no_grad():
                p = self.neighborhood.weights(self.grid_distance, self.step)
                enc = onehot @ p
                del onehot, p
                g = self.decay
                size = g * self.cluster_size + (1 - g) * enc.sum(0)
                n = size.sum()
                size = (size + self.eps) / (n + self.k * self.eps) * n
                self.embed_sum.mul_(g).add_(enc.t() @ zd, alpha=1 - g)
                self.cluster_size.copy_(size)
                self.codebook.copy_(self.embed_sum / size.unsqueeze(1))
                self.step += 1
        return z + (q - z).detach(), indices, loss


def vq_available() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
        return True
    except Exception:  # not installed, or broken by the installed torch
        return False


@dataclass
class Method:
    name: str
    build: Callable[[int, int], Callable[[torch.Tensor], object]]  # (K, D) -> step(z)


def build_method(name: str, k: int, d: int, step: int, device="cpu"):
    """A callable ``step(z)`` running one training forward of method ``name`` at codebook size ``k``."""
    if name == "floor":
        e = torch.randn(k, d, device=device)
        return lambda z: floor_assign(z, e)
    if name == "assign":
        e = torch.randn(k, d, device=device)
        return lambda z: nearest_codes(z, e)
    if name.startswith("ksom-"):
        q = KohonenQuantizer(d, k, neighborhood=name[5:]).to(device).train()

        def run(z):
            q.step.fill_(step)
            return q(z)
        return run
    if name == "dense":
        q = DenseKSOM(d, k, "hard").to(device).train()

        def run(z):
            q.step = step
            return q(z)
        return run
    if name == "vq":
        from vector_quantize_pytorch import VectorQuantize
        q = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25, kmeans_init=False,
                           rotation_trick=False).to(device).train()
        return lambda z: q(z)
    raise ValueError(f"unknown method {name!r}")


def skip_reason(name: str, k: int, n: int, args) -> str:
    """Why a method has no entry at this K (a table cell)."""
    dense_gib = (5 * n * k + 3 * k * k) * 4 / 2**30
    if name == "dense" and dense_gib * 2**30 > DENSE_MAX_BYTES:
        return f"does not fit ({dense_gib:.0f} GiB)"
    if name == "dense":
        return f"not run (K > --dense-max-k {args.dense_max_k})"
    if name == "vq" and args.vq:
        return f"does not fit (~6 N K floats = {6 * n * k * 4 / 2**30:.0f} GiB)"
    return "n/a"


def methods_for(k: int, n: int, args) -> list[str]:
    names = ["floor", "assign"] + [f"ksom-{kern}" for kern in KERNELS]
    dense_bytes = 4 * (5 * n * k + 3 * k * k)
    if k <= args.dense_max_k and dense_bytes <= DENSE_MAX_BYTES:
        names.append("dense")
    if args.vq and 4 * n * k <= VQ_MAX_BYTES:
        names.append("vq")
    return names


LABELS = {
    "floor": "floor (distances + argmin; unchunked up to 2^28 distances)",
    "assign": "`nearest_codes` alone (the library's assignment)",
    "ksom-none": "KSOM none (EMA-VQ)",
    "ksom-hard": "KSOM hard",
    "ksom-exponential": "KSOM exponential",
    "ksom-gaussian": "KSOM gaussian",
    "dense": "dense one-hot @ P (hard)",
    "vq": "VectorQuantize (EMA)",
}


# ------------------------------------------------------------------------------------------- timing
def time_methods(k: int, n: int, d: int, names: list[str], args) -> dict[str, dict]:
    """Median wall time (ms) per method, measured in interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).requires_grad_(True)
    runs = {name: build_method(name, k, d, args.step) for name in names}
    times = {name: [] for name in names}
    slow = set()
    for name, run in runs.items():  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            run(z)
            if time.perf_counter() - t0 > args.slow_seconds:
                break
        if (time.perf_counter() - t0) / max(1, args.warmup) > args.slow_seconds:
            slow.add(name)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            if name in slow and len(times[name]) >= args.slow_repeats:
                continue
            t0 = time.perf_counter()
            runs[name](z)
            times[name].append(time.perf_counter() - t0)
        print(f"  K={k} round {r + 1}/{args.repeats}: " + ", ".join(
            f"{nm} {1e3 * times[nm][-1]:.0f}" for nm in names if times[nm]), flush=True)
    return {name: {"ms": 1e3 * statistics.median(ts), "runs": len(ts)} for name, ts in times.items()}


# ------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_peak_reset() -> int:
    """Current RSS in bytes, after resetting the peak-RSS mark (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    rss = _proc_status_kib("VmRSS")
    return (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss_peak() -> int:
    """Peak RSS in bytes: ``VmHWM`` (ru_maxrss of this process image: unlike ``getrusage``, it does not
    inherit the high-water mark of the parent that forked it)."""
    hwm = _proc_status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _child_main(spec: dict) -> None:
    """Runs in a fresh subprocess: peak memory of two training forwards of one configuration."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(spec["n"], spec["d"], generator=gen).to(device).requires_grad_(True)
    if spec["method"] == "vq":
        import vector_quantize_pytorch  # noqa: F401  (import cost is not the quantiser's memory)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_peak_reset()
    run = build_method(spec["method"], spec["k"], spec["d"], spec["step"], device)
    for _ in range(spec.get("forwards", 2)):
        out = run(z)
        del out
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_peak()
    print("RESULT " + json.dumps({"peak_bytes": peak - base}), flush=True)


def measure_memory(method: str, k: int, n: int, d: int, args) -> float | None:
    """Peak bytes of one configuration in a fresh subprocess (None if it failed)."""
    spec = {"method": method, "k": k, "n": n, "d": d, "threads": args.threads, "step": args.step,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "forwards": 1 if method == "dense" and k >= 16384 else 2}  # one dense forward there takes minutes
    # large blocks straight from mmap, so that freed-but-resident heap memory does not hide allocations
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=args.child_timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["peak_bytes"]
    print(f"  memory run {method} K={k} N={n} failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}",
          flush=True)
    return None


# ------------------------------------------------------------------------------------------- VQ-VAE step
def cifar_step_table(args) -> tuple[list[str], dict]:
    """Median time of one CIFAR-10 VQ-VAE training step (batch 256), EMA-VQ vs KSOM-hard, interleaved."""
    try:
        from kohonen_vae.models import build_model
    except Exception as exc:  # the models package is not there (yet)
        return [f"(skipped: kohonen_vae.models.build_model is not importable: {exc})"], {}
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=gen)
    x = images.float().div(255.0).sub(0.5).div(0.25)  # a fixed standardisation
    steps = {}
    for name, quantizer in (("EMA-VQ", "ema"), ("KSOM hard", "hard")):
        torch.manual_seed(0)
        model = build_cifar_model(build_model, quantizer)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = model_loss(out, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss
        steps[name] = step
    names = list(steps)
    for name in names:
        for _ in range(args.warmup):
            steps[name]()
    times = {name: [] for name in names}
    for r in range(args.cifar_repeats):
        for name in names[r % 2:] + names[:r % 2]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"  CIFAR step round {r + 1}/{args.cifar_repeats}: " + ", ".join(
            f"{nm} {1e3 * times[nm][-1]:.0f}" for nm in names), flush=True)
    return [], {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def build_cifar_model(build_model, quantizer: str):
    """The paper's CIFAR-10 VQ-VAE (K = 512, D = 64, 32x16 grid) with an EMA-VQ or KSOM-hard quantiser."""
    qcfg = {"type": "ema"} if quantizer == "ema" else {"type": "ksom", "neighborhood": quantizer}
    return build_model({"arch": "vqvae", "quantizer": qcfg})


def model_loss(out, x):
    """The training loss: reconstruction MSE + commitment loss."""
    return F.mse_loss(out.reconstruction.float(), x) + out.commitment_loss


# ------------------------------------------------------------------------------------------- report
def machine_facts(threads: int) -> list[str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    facts = [f"CPU: {cpu}, `nproc` = {os.cpu_count()}", f"torch {torch.__version__}, torch.set_num_threads({threads})",
             f"Python {platform.python_version()}, kohonen_vae {kohonen_vae.__version__}"]
    if vq_available():
        import importlib.metadata as md
        facts.append(f"vector-quantize-pytorch {md.version('vector-quantize-pytorch')}")
    if torch.cuda.is_available():
        facts.append(f"GPU: {torch.cuda.get_device_name()}")
    return facts


def fmt_ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "failed"
    mib = b / 2**20
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: K = 512 only, 3 rounds, small CIFAR run")
    ap.add_argument("--out", help="also write the markdown tables to this file")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS_DEFAULT), help="codebook sizes")
    ap.add_argument("-n", type=int, default=N_DEFAULT, help="vectors per forward")
    ap.add_argument("-d", type=int, default=D_DEFAULT, help="vector size")
    ap.add_argument("--step", type=int, default=0, help="schedule step of every timed forward (0: widest kernels)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per method first")
    ap.add_argument("--slow-seconds", type=float, default=15.0,
                    help="a method whose warm-up forward takes longer is timed only --slow-repeats times")
    ap.add_argument("--slow-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--dense-max-k", type=int, default=16384, help="largest K for the dense one-hot @ P method")
    ap.add_argument("--no-vq", dest="vq", action="store_false", help="leave out vector-quantize-pytorch")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-cifar", dest="cifar", action="store_false", help="skip the VQ-VAE step table")
    ap.add_argument("--batch", type=int, default=256, help="CIFAR-10 batch size")
    ap.add_argument("--cifar-repeats", type=int, default=9)
    ap.add_argument("--big-n", type=int, default=524288,
                    help="N of the chunking check (an ImageNet VQ-VAE-2 bottom level: 128 x 64 x 64)")
    ap.add_argument("--child-timeout", type=float, default=1200.0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        _child_main(json.loads(args.child))
        return 0
    if args.quick:
        args.ks, args.repeats, args.cifar_repeats, args.big_n = [512], 3, 3, 65536
    torch.set_num_threads(args.threads)
    if args.vq and not vq_available():
        print("note: vector-quantize-pytorch is not installed (pip install -e .[bench]); its column is skipped")
        args.vq = False
    n, d = args.n, args.d
    command = "python benchmarks/quantizer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}`", ""] + [f"- {f}" for f in machine_facts(args.threads)] + [""]

    # -- table 1: time -----------------------------------------------------------------------------
    all_names = ["floor", "assign"] + [f"ksom-{kern}" for kern in KERNELS] + ["dense"] + (["vq"] if args.vq else [])
    results: dict[int, dict] = {}
    for k in args.ks:
        names = methods_for(k, n, args)
        print(f"K = {k}: timing {', '.join(names)}", flush=True)
        results[k] = time_methods(k, n, d, names, args)

    lines += [f"### One training forward, N = {n:,}, D = {d}, schedule step {args.step} "
              f"(median of {args.repeats} interleaved rounds; ratio = time / floor)", ""]
    lines.append("| method | " + " | ".join(f"K = {k:,}" for k in args.ks) + " |")
    lines.append("| --- |" + " --- |" * len(args.ks))
    for name in all_names:
        cells = []
        for k in args.ks:
            r = results[k].get(name)
            if r is None:
                cells.append(skip_reason(name, k, n, args))
                continue
            ratio = r["ms"] / results[k]["floor"]["ms"]
            note = f" ({r['runs']} runs)" if r["runs"] < args.repeats else ""
            cells.append(f"{fmt_ms(r['ms'])} ({ratio:.2f}x){note}")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    if args.vq:
        lines += ["", "KSOM speed-up over VectorQuantize (VQ time / KSOM time): " + "; ".join(
            f"K = {k:,}: " + ", ".join(f"{kern} {results[k]['vq']['ms'] / results[k][f'ksom-{kern}']['ms']:.2f}x"
                                      for kern in ("hard", "exponential"))
            for k in args.ks if "vq" in results[k])]
    smoother_methods = {k: {kern: KohonenQuantizer(d, k, neighborhood=kern).smoother.choose(args.step)
                            for kern in KERNELS[1:]} for k in args.ks}
    lines += ["", "Smoothing method chosen by `smoothing='auto'` at this step: " + "; ".join(
        f"K = {k:,}: " + ", ".join(f"{kern} {m}" for kern, m in smoother_methods[k].items()) for k in args.ks)]
    print("\n".join(lines), flush=True)

    # -- table 1b: memory --------------------------------------------------------------------------
    if args.memory:
        what = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else \
            "peak RSS (VmHWM, i.e. ru_maxrss of the process image) of a fresh subprocess during two " \
            "forwards minus its RSS after imports and input creation"
        mem_lines = ["", f"### Peak memory of two training forwards (one for dense at K >= 16,384); {what}", ""]
        mem_lines.append("| method | " + " | ".join(f"K = {k:,}" for k in args.ks) + " |")
        mem_lines.append("| --- |" + " --- |" * len(args.ks))
        mem: dict[tuple, float | None] = {}
        for k in args.ks:
            for name in methods_for(k, n, args):
                print(f"memory: {name} K={k}", flush=True)
                mem[(name, k)] = measure_memory(name, k, n, d, args)
        for name in all_names:
            mem_lines.append(f"| {LABELS[name]} | " + " | ".join(
                fmt_bytes(mem[(name, k)]) if (name, k) in mem else skip_reason(name, k, n, args)
                for k in args.ks) + " |")
        k_big = 512
        on_gpu = torch.cuda.is_available()  # where the memory subprocesses run
        chunk = DISTANCE_CHUNK_ELEMENTS if on_gpu else CPU_BLOCK_ELEMENTS
        chunk_name = "DISTANCE_CHUNK_ELEMENTS" if on_gpu else "CPU_BLOCK_ELEMENTS"
        full_mib = args.big_n * k_big * 4 / 2**20
        mem_lines += ["", f"Chunked distances (`{chunk_name}` = {chunk:,}, {chunk * 4 / 2**20:.0f} MiB a chunk), "
                      f"N = {args.big_n:,}, K = {k_big}, D = {d} "
                      f"(the whole N x K matrix would be {full_mib:,.0f} MiB; the input itself is "
                      f"{args.big_n * d * 4 / 2**20:,.0f} MiB):", ""]
        mem_lines += ["| method | peak memory |", "| --- | --- |"]
        for name in ("ksom-hard", "ksom-none", "floor"):
            print(f"memory: {name} K={k_big} N={args.big_n}", flush=True)
            peak = measure_memory(name, k_big, args.big_n, d, args)
            mem_lines.append(f"| {LABELS[name]} | {fmt_bytes(peak)} |")
        print("\n".join(mem_lines), flush=True)
        lines += mem_lines

    # -- table 2: VQ-VAE step ----------------------------------------------------------------------
    if args.cifar:
        print("CIFAR-10 VQ-VAE step", flush=True)
        notes, cifar = cifar_step_table(args)
        cif_lines = ["", f"### One CIFAR-10 VQ-VAE training step, batch {args.batch} (forward, backward, AdamW, "
                     f"quantiser update; median of {args.cifar_repeats} interleaved rounds)", ""] + notes
        if cifar:
            base = cifar["EMA-VQ"]
            cif_lines += ["| quantiser | step time | ratio to EMA-VQ |", "| --- | --- | --- |"]
            cif_lines += [f"| {nm} | {fmt_ms(ms)} | {ms / base:.3f}x |" for nm, ms in cifar.items()]
        print("\n".join(cif_lines), flush=True)
        lines += cif_lines

    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
