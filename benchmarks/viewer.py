"""How fast the explorer redraws when a control changes.

Builds a synthetic result of 50 steps x 24 layers x 5 permutations x 6
bit-widths (`peelnb.testing.synthetic_result`), opens `peelnb.explore` on it
and, for each control, switches between two values ``--repeats`` times,
timing each switch (trait set -> figures updated -> PNG images in the widget).
Prints the median and the slowest switch per control (goal: well under a
second), and the time to build the viewer. Next to wall time it prints the
process's CPU time: on a shared machine wall time includes waiting for a
core, CPU time is what the redraw costs on an idle one.

Usage: ``python benchmarks/viewer.py [--repeats N]``. No torch, no kernel needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib

matplotlib.use("Agg")

import peelnb  # noqa: E402
from peelnb.testing import synthetic_result  # noqa: E402

SWITCHES = {
    "bits": (1.58, 4.0),
    "variable": ("local_err", "gap"),
    "reduce": ("mean", "best"),
    "step_range": ((1000, 4000), (0, 4900)),
    "floor": (0.02, 0.01),
    "noise_multiple": (2.0, 1.0),
    "layer": (3, 7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="switches per control (default 10)")
    args = parser.parse_args()
    ds = synthetic_result(steps=50, layers=24, permutations=5, bits=[1, 1.58, 2, 4, 8, 32], planted=7)
    started = time.perf_counter()
    viewer = peelnb.explore(ds)
    built = time.perf_counter() - started
    print(f"result: {dict(ds['loss_ref'].sizes)}; viewer built in {built * 1000:.0f} ms")
    medians = {}
    for name, values in SWITCHES.items():
        wall, cpu = [], []
        for i in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            setattr(viewer, name, values[i % 2])
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        medians[name] = statistics.median(wall)
        print(f"{name:>15}: median {medians[name] * 1000:4.0f} ms (CPU {statistics.median(cpu) * 1000:4.0f} ms), "
              f"slowest {max(wall) * 1000:4.0f} ms over {args.repeats} switches")
    print(f"slowest median: {max(medians.values()) * 1000:.0f} ms (goal: well under 1000 ms)")


if __name__ == "__main__":
    main()
