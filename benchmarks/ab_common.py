"""What the A/B benchmarks share: interleaved timing in one process, and writing their markdown tables."""
import statistics
import time


def interleaved_median_ms(runs: dict, rounds: int, warmup_rounds: int = 0, setup: dict | None = None) -> dict:
    """Median wall time in ms of each zero-argument callable in ``runs``: every round calls each once, the
    one going first rotating (machines here are shared and noisy, so only same-run ratios count). ``setup``
    maps a name to an untimed callable run just before it; ``warmup_rounds`` rounds are not recorded."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(warmup_rounds + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if setup and name in setup:
                setup[name]()
            t0 = time.perf_counter()
            runs[name]()
            if r >= warmup_rounds:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def emit(lines: list, out: str | None) -> None:
    """Print the table and, with ``--out``, append it to that file (several runs can share one file)."""
    print("\n".join(lines))
    if out:
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n\n")
