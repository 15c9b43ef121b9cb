"""Where the time of one KSOM training forward goes: a torch.profiler table per operator.

    python benchmarks/profile_forward.py --k 512 --neighborhood hard --threads 2
    python benchmarks/profile_forward.py --k 4096 --neighborhood exponential --threads 1 --out prof.md

Runs ``--warmup`` untimed forwards, then profiles ``--repeats`` forwards (N = 16,384, D = 64, every one at
schedule step ``--step``) and prints the operators by self CPU time, in milliseconds per forward, with
their input shapes, so each can be traced to a line of the forward (distance GEMM, argmin, statistics,
smoothing, EMA update, loss, straight-through output).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from kohonen_vae import KohonenQuantizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("-n", type=int, default=16384)
    ap.add_argument("-d", type=int, default=64)
    ap.add_argument("--neighborhood", default="hard")
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rows", type=int, default=16, help="operators to list")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vq = KohonenQuantizer(args.d, args.k, neighborhood=args.neighborhood).train()
    z = torch.randn(args.n, args.d, requires_grad=True)

    def forward():
        vq.step.fill_(args.step)
        return vq(z)

    for _ in range(args.warmup):
        forward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.repeats):
            forward()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.repeats
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
    lines = [f"Command: `python benchmarks/profile_forward.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"K = {args.k:,}, N = {args.n:,}, D = {args.d}, {args.neighborhood} kernel at step {args.step} "
             f"(smoothing: {vq.smoother.choose(args.step)}), torch.set_num_threads({args.threads}); "
             f"self CPU time per forward, {total:.1f} ms in all", "",
             "| operator | input shapes | calls per forward | ms per forward | share |", "| --- | --- | --- | --- | --- |"]
    for e in rows:
        ms = e.self_cpu_time_total / 1e3 / args.repeats
        shapes = str(e.input_shapes).replace("|", "/")
        lines.append(f"| `{e.key}` | {shapes} | {e.count / args.repeats:g} | {ms:.2f} | {100 * ms / total:.0f}% |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
