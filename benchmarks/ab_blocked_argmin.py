"""A/B of the argmin in the CPU assignment, in one process, interleaved (kohonen_vae.quantizers.base).

The reused-block loop with ``argmin`` over each row of K distances (the assignment before the change)
against :func:`nearest_codes`, which for K >= 4 x ARGMIN_BLOCK reduces blocks of 64 distances with ``amin``
first; the indices are checked equal.

    python benchmarks/ab_blocked_argmin.py --threads 2 --out benchmarks/results/ab-blocked-argmin.md
"""
import argparse
import sys

import torch
from ab_common import emit, interleaved_median_ms

from kohonen_vae.quantizers.base import distance_block_rows, nearest_codes


def plain_blocks(z, e):
    e_sq, et = e.square().sum(1), e.t()
    n, k = z.shape[0], e.shape[0]
    rows = distance_block_rows(n, k)
    block = torch.empty(rows, k)
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        torch.addmm(e_sq, z[start:stop], et, alpha=-2.0, out=block[: stop - start])
        torch.argmin(block[: stop - start], 1, out=out[start:stop])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["16384x512", "16384x4096", "100000x2500"],
                    help="N x K (D = 64)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also append the table (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"D = 64, {args.threads} threads, median ms of {args.rounds} interleaved rounds (1 warm-up)", "",
             "| N | K | argmin per row of K | nearest_codes (blocked argmin) | ratio |", "| --- | --- | --- | --- | --- |"]
    for case in args.cases:
        n, k = (int(v) for v in case.split("x"))
        z, e = torch.randn(n, 64, generator=gen), torch.randn(k, 64, generator=gen)
        assert torch.equal(plain_blocks(z, e), nearest_codes(z, e)), case
        med = interleaved_median_ms({"plain": lambda: plain_blocks(z, e), "blocked": lambda: nearest_codes(z, e)},
                                    args.rounds, warmup_rounds=1)
        lines.append(f"| {n:,} | {k:,} | {med['plain']:.1f} | {med['blocked']:.1f} | "
                     f"{med['plain'] / med['blocked']:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
