"""A/B of two small forward costs, in one process, interleaved (docs/performance.md, "optimisations").

* straight-through output: the arithmetic ``q + (z - sg(z))`` (two (N, D) passes) vs the library's autograd
  function that returns ``q`` as it is;
* batch statistics: ``index_add_`` into the strided column block of the packed (K, 1 + D) tensor vs into a
  contiguous (K, D) buffer and one small concatenation (the library's).

    python benchmarks/ab_forward_overheads.py --k 512 --neighborhood exponential --rounds 31
"""
import argparse
import statistics
import sys
import time

import torch

import kohonen_vae.quantizers.base as base
import kohonen_vae.quantizers.kohonen as kohonen
from kohonen_vae import KohonenQuantizer


def arithmetic_straight_through(z, q):
    if not (torch.is_grad_enabled() and z.requires_grad):
        return q
    return q + (z - z.detach())


def strided_statistics(z, indices, counts):
    stats = torch.zeros(counts.shape[0], 1 + z.shape[1], dtype=torch.float32, device=z.device)
    stats[:, 0] = counts
    stats[:, 1:].index_add_(0, indices, z.detach().float())
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("-n", type=int, default=16384)
    ap.add_argument("-d", type=int, default=64)
    ap.add_argument("--neighborhood", default="exponential")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    library = (base.straight_through, kohonen.batch_statistics)
    variants = {
        "before (arithmetic STE, strided stats)": (arithmetic_straight_through, strided_statistics),
        "autograd STE only": (library[0], strided_statistics),
        "contiguous stats only": (arithmetic_straight_through, library[1]),
        "library (both)": library,
    }
    z = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    e = torch.randn(args.k, args.d)
    quantizers = {name: KohonenQuantizer(args.d, args.k, neighborhood=args.neighborhood).train() for name in variants}
    names = ["floor"] + list(variants)
    times = {name: [] for name in names}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name == "floor":
                t0 = time.perf_counter()
                with torch.no_grad():
                    torch.addmm(e.square().sum(1), z, e.t(), alpha=-2.0).argmin(1)
            else:
                base.straight_through, kohonen.batch_statistics = variants[name]
                q = quantizers[name]
                q.step.zero_()
                t0 = time.perf_counter()
                q(z)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    base.straight_through, kohonen.batch_statistics = library
    floor = statistics.median(times["floor"])
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"K = {args.k}, N = {args.n}, D = {args.d}, {args.neighborhood} kernel at step 0, {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds", "", "| variant | ms | ratio to floor |", "| --- | --- | --- |"]
    for name in names:
        m = statistics.median(times[name])
        lines.append(f"| {name} | {1e3 * m:.1f} | {m / floor:.3f}x |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:  # several kernels append to one file
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
