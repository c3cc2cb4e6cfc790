"""Static figures of peel results (matplotlib). Never imports torch.

Every function takes the result first, everything else keyword-only, and
returns the matplotlib Figure or Axes it drew on.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .results import FLAG_FLOOR, fmt_bits, validate

PLANTED_COLOR = "#d62728"


def planted_layer(ds: xr.Dataset) -> tuple[str, int] | None:
    """``(kind, layer)`` of the fault planted in the peeled run, from its attributes, or None."""
    fault = str(ds.attrs.get("fault", "none"))
    kind, sep, layer = fault.partition(":")
    return (kind, int(layer)) if sep and layer.isdigit() else None


def gap_lines(ds: xr.Dataset, *, bits: float, ax: Axes | None = None, legend: bool = True) -> Axes:
    """Best gap of every layer across training steps, at one bit-width.

    One line per layer (the planted layer, if any, thick and red); filled
    markers where a layer is flagged under-optimized; the grey band is where a
    reference matches the trained layer within the default 0.01 nats. The y
    axis is linear within +-0.01 nats and logarithmic beyond, so the first
    block's large gaps and the others' small ones are readable together.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    bits : float
        Bit-width to show.
    ax : matplotlib Axes, optional
        Where to draw; default a new figure.
    legend : bool
        Draw a legend of the layers.

    Returns
    -------
    matplotlib Axes
    """
    validate(ds)
    if not np.isclose(ds["bits"].values, bits).any():
        raise ValueError(f"bits={bits:g} is not in the result; bits: {ds['bits'].values.tolist()}")
    bits = float(ds["bits"].values[np.isclose(ds["bits"].values, bits)][0])
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    best = ds.peel.best().sel(bits=bits)
    flags = ds.peel.flagged().sel(bits=bits)
    planted = planted_layer(ds)
    layers = ds["layer"].values
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    steps = ds["step"].values
    for color, layer in zip(colors, layers):
        y = best.sel(layer=layer).values
        is_planted = planted is not None and planted[1] == layer
        label = f"layer {layer}" + (f" (planted {planted[0]})" if is_planted else "")
        style = dict(color=PLANTED_COLOR, lw=2.8, zorder=3) if is_planted else dict(color=color, lw=1.3)
        (line,) = ax.plot(steps, y, label=label, **style)
        hit = flags.sel(layer=layer).values
        ax.plot(steps[hit], y[hit], "o", color=line.get_color(), ms=5, zorder=4)
        ax.plot(steps[~hit], y[~hit], "o", mfc="none", color=line.get_color(), ms=4, zorder=4)
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    values = best.values[np.isfinite(best.values)]
    top = max(2 * FLAG_FLOOR, 1.5 * values.max()) if values.size else 2 * FLAG_FLOOR
    ax.axhspan(-FLAG_FLOOR, top, color="0.92", zorder=0, lw=0)
    ax.set_yscale("symlog", linthresh=FLAG_FLOOR)
    ax.set_ylim(top=top)
    ax.set_xlabel("training step")
    ax.set_ylabel("best gap (nats/token)")
    ax.set_title(f"{fmt_bits(bits)} bits")
    if legend:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  ncols=2 if len(layers) > 12 else 1)
    return ax


def loss_curve(ds: xr.Dataset, *, ax: Axes | None = None, label: str = "") -> Axes:
    """Held-out loss of the trained checkpoints across steps (``label`` prefixes the title)."""
    validate(ds)
    ax = ax or plt.subplots(figsize=(4, 3.5))[1]
    ax.plot(ds["step"].values, ds["loss_model"].values, "o-", color="k", ms=4)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"{label}: trained model" if label else "trained model", fontweight="bold" if label else None)
    return ax


def overview(results: xr.Dataset | Mapping[str, xr.Dataset], *, bits: list[float] | None = None) -> Figure:
    """The demo's figure: per result, the loss curve and the gap lines of each bit-width.

    Parameters
    ----------
    results : Dataset or mapping of str to Dataset
        One result, or several labelled results (one row each).
    bits : list of float, optional
        Bit-widths to show (default all in the first result).

    Returns
    -------
    matplotlib Figure
    """
    rows = {"": results} if isinstance(results, xr.Dataset) else dict(results)
    if not rows:
        raise ValueError("overview needs at least one result")
    first = validate(next(iter(rows.values())))
    bits = [float(b) for b in (bits if bits is not None else first["bits"].values[::-1])]
    fig, axes = plt.subplots(len(rows), 1 + len(bits), figsize=(3.6 * (1 + len(bits)), 3.3 * len(rows)),
                             squeeze=False, layout="constrained")
    for row, (label, ds) in zip(axes, rows.items()):
        loss_curve(ds, ax=row[0], label=label)
        for i, (ax, b) in enumerate(zip(row[1:], bits)):
            gap_lines(ds, bits=b, ax=ax, legend=i == len(bits) - 1)
            if i:
                ax.set_ylabel("")
    view = first.attrs.get("view", "replace")
    fig.suptitle(
        f"peelnb {view} view: gap = loss(trained) - loss(best reference); grey band: within "
        f"{FLAG_FLOOR:g} nats of the trained layer; filled markers: flagged under-optimized",
        fontsize="medium",
    )
    return fig
