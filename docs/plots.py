"""Render docs/img/plots.png: the static plots of `peelnb.plot` on the bundled example.

Usage: ``python docs/plots.py``. The example (`peelnb.tutorial.example_result`)
is a real peel of a 3-layer model whose layer 1 was frozen during training.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import peelnb  # noqa: E402
from peelnb import plot  # noqa: E402

OUT = Path(__file__).resolve().parent / "img" / "plots.png"


def main() -> None:
    ds = peelnb.tutorial.example_result()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.6), layout="constrained")
    fig.get_layout_engine().set(wspace=0.1, hspace=0.08)
    plot.gap_heatmap(ds, bits=32, ax=axes[0, 0])
    plot.bits_profile(ds, step=int(ds["step"][-1]), ax=axes[0, 1])
    plot.layer_curves(ds, layer=0, bits=1.58, ax=axes[1, 0])
    plot.layer_curves(ds, layer=1, bits=1.58, ax=axes[1, 1])
    fig.suptitle("peelnb.plot on the bundled example (3 layers, layer 1 frozen during training)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(OUT)


if __name__ == "__main__":
    main()
