"""A/B of the FFT smoothing's zero padding (docs/performance.md, optimisation 7): padded by the kernel's
radius (the library) vs by the whole grid (exact for any kernel), one process, interleaved.

    python benchmarks/ab_fft_padding.py --shape 256 256 --steps 0 20 100 300 --out benchmarks/results/ab-fft-padding.md
"""
import argparse
import sys

import torch
from ab_common import emit, interleaved_median_ms

from kohonen_vae.geometry import Grid
from kohonen_vae.neighborhood import make_neighborhood
from kohonen_vae.smoothing import GridSmoother


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--channels", type=int, default=65, help="1 + D: counts and sums")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20, 100, 300])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = Grid(tuple(args.shape))
    kernel = make_neighborhood("exponential")
    stats = torch.rand(grid.size, args.channels, generator=torch.Generator().manual_seed(0))
    radius_padded = GridSmoother(grid, kernel, method="fft")
    grid_padded = GridSmoother(grid, kernel, method="fft")
    grid_padded._fft_lengths = lambda sizes, radius: [2 * s for s in sizes]
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"exponential kernel (sigma0 = 10, tau = 0.1) on a {'x'.join(map(str, args.shape))} grid, "
             f"{args.channels} channels, {args.threads} threads, median ms of {args.rounds} interleaved rounds", "",
             "| step | radius | FFT lengths (radius-padded) | radius-padded | grid-padded | speed-up | max rel. difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in args.steps:
        radius = kernel.radius(t, radius_padded.cutoff)
        a, b = radius_padded(stats, t), grid_padded(stats, t)
        err = float((a - b).abs().max() / b.abs().max())
        med = interleaved_median_ms({"radius": lambda: radius_padded(stats, t), "grid": lambda: grid_padded(stats, t)},
                                    args.rounds)
        r_ms, g_ms = med["radius"], med["grid"]
        lengths = radius_padded._fft_lengths(list(reversed(grid.shape)), radius)
        lines.append(f"| {t} | {radius:.1f} | {' x '.join(map(str, lengths))} | {r_ms:.0f} | {g_ms:.0f} | "
                     f"{g_ms / r_ms:.2f}x | {err:.1e} |")
    emit(lines, args.out)

if __name__ == "__main__":
    main()
