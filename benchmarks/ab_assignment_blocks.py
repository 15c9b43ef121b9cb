"""A/B of the assignment's memory layout, in one process, interleaved (docs/performance.md, optimisation 4).

One ``addmm`` + ``argmin`` over a fresh N x K result (the floor) against blocks of 2^e distances written
with ``out=`` into one reused buffer, for several block sizes; every variant's indices are checked equal.

    python benchmarks/ab_assignment_blocks.py --threads 2 --ks 512 4096 --out benchmarks/results/ab-assignment-blocks.md
"""
import argparse
import sys

import torch
from ab_common import emit, interleaved_median_ms


def whole(z, e):
    return torch.addmm(e.square().sum(1), z, e.t(), alpha=-2.0).argmin(1)


def blocked(z, e, elements):
    e_sq, et = e.square().sum(1), e.t()
    n, k = z.shape[0], e.shape[0]
    rows = max(64, elements // k)
    block = torch.empty(rows, k)
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        torch.addmm(e_sq, z[start:stop], et, alpha=-2.0, out=block[: stop - start])
        torch.argmin(block[: stop - start], 1, out=out[start:stop])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("-n", type=int, default=16384)
    ap.add_argument("-d", type=int, default=64)
    ap.add_argument("--exponents", type=int, nargs="+", default=[18, 19, 20, 21, 23])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"N = {args.n}, D = {args.d}, {args.threads} threads, median ms of {args.rounds} interleaved rounds", "",
             "| K | one addmm (floor) | " + " | ".join(f"blocks of 2^{x}" for x in args.exponents) + " |",
             "| --- | --- |" + " --- |" * len(args.exponents)]
    for k in args.ks:
        z, e = torch.randn(args.n, args.d, generator=gen), torch.randn(k, args.d, generator=gen)
        variants = {"whole": lambda: whole(z, e)}
        variants.update({x: (lambda x=x: blocked(z, e, 1 << x)) for x in args.exponents})
        reference = whole(z, e)
        for name, f in variants.items():
            assert torch.equal(f(), reference), name
        med = interleaved_median_ms(variants, args.rounds)
        lines.append(f"| {k:,} | {med['whole']:.1f} | " + " | ".join(f"{med[x]:.1f}" for x in args.exponents) + " |")
    emit(lines, args.out)

if __name__ == "__main__":
    main()
