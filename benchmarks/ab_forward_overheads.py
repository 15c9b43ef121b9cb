"""A/B of two small forward costs, in one process, interleaved (docs/performance.md, "optimisations").

* straight-through output: the arithmetic ``q + (z - sg(z))`` (two (N, D) passes) vs the library's autograd
  function that returns ``q`` as it is;
* batch statistics: ``index_add_`` into the strided column block of the packed (K, 1 + D) tensor vs into a
  contiguous (K, D) buffer and one small concatenation (the library's).

    python benchmarks/ab_forward_overheads.py --k 512 --neighborhood exponential --rounds 31
"""
import argparse
import sys

import torch
from ab_common import emit, interleaved_median_ms

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

    def floor():
        with torch.no_grad():
            torch.addmm(e.square().sum(1), z, e.t(), alpha=-2.0).argmin(1)

    def prepare(name):  # untimed: install the variant's two functions, restart the schedule
        def setup():
            base.straight_through, kohonen.batch_statistics = variants[name]
            quantizers[name].step.zero_()
        return setup

    runs = {"floor": floor, **{name: (lambda name=name: quantizers[name](z)) for name in variants}}
    med = interleaved_median_ms(runs, args.rounds, warmup_rounds=2, setup={name: prepare(name) for name in variants})
    base.straight_through, kohonen.batch_statistics = library
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"K = {args.k}, N = {args.n}, D = {args.d}, {args.neighborhood} kernel at step 0, {args.threads} threads, "
             f"median of {args.rounds} interleaved rounds", "", "| variant | ms | ratio to floor |", "| --- | --- | --- |"]
    for name, ms in med.items():
        lines.append(f"| {name} | {ms:.1f} | {ms / med['floor']:.3f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
