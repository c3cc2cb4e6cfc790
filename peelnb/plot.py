"""Static figures of peel results (matplotlib). Never imports torch.

Every function takes the result first, everything else keyword-only, accepts
``ax=`` where it draws one panel, and returns the matplotlib Figure or Axes it
drew on. Bad input (a Dataset off the schema, a bits value, step or layer not
in the data, an empty selection) raises a ValueError that says what to pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from .results import DIMS, FLAG_FLOOR, NATS, NOISE_MULTIPLE, bits_phrase, fmt_bits, validate

PLANTED_COLOR = "#d62728"
HEATMAP_VARIABLES = ("gap", "loss_ref", "local_err", "loss_model_q")
"""What `gap_heatmap` shows first; any other variable with dims step and layer works too."""
REDUCTIONS = ("best", "mean")


def planted_layer(ds: xr.Dataset) -> tuple[str, int] | None:
    """``(kind, layer)`` of the fault planted in the peeled run, from its attributes, or None."""
    fault = str(ds.attrs.get("fault", "none"))
    kind, sep, layer = fault.partition(":")
    return (kind, int(layer)) if sep and layer.isdigit() else None


def _check(ds: xr.Dataset) -> xr.Dataset:
    """Validate ``ds`` against the result schema and refuse empty dimensions; return it.

    Raises
    ------
    ValueError
        Naming each missing variable or dimension, or the empty dimension, and what to pass instead.
    """
    try:
        validate(ds)
    except ValueError as err:
        raise ValueError(
            f"{err}. Pass a result from peelnb.peel, peelnb.open or peelnb.testing.synthetic_result "
            "(schema: DESIGN.md §5), or add what is missing"
        ) from None
    empty = [dim for dim in DIMS if ds.sizes[dim] == 0]
    if empty:
        raise ValueError(
            f"the selection is empty: no {' and no '.join(empty)} left; select a range that holds at least one "
            f"value (e.g. ds.sel(step=slice(lo, hi)) with lo <= hi around the result's steps)"
        )
    return ds


def _checked_bits(ds: xr.Dataset, bits: float) -> float:
    """The ``bits`` coordinate value equal (within float tolerance) to ``bits``, so 1.58 finds 1.58."""
    values = ds["bits"].values
    try:
        match = np.isclose(values, float(bits))
    except (TypeError, ValueError):
        match = np.zeros(values.shape, dtype=bool)
    if not match.any():
        raise ValueError(f"bits={bits:g} is not in the result; bits: {values.tolist()}; pass one of these"
                         if isinstance(bits, (int, float, np.number)) else
                         f"bits={bits!r} is not a number; pass one of the result's bits: {values.tolist()}")
    return float(values[match][0])


def _checked_label(ds: xr.Dataset, dim: str, value: int) -> int:
    values = ds[dim].values
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value not in values:
        shown = values.tolist() if len(values) <= 20 else f"{values[:3].tolist()} ... {values[-3:].tolist()}"
        raise ValueError(f"{dim}={value!r} is not in the result; {dim}s: {shown}; pass one of these")
    return int(value)


def _checked_step(ds: xr.Dataset, step: int) -> int:
    """``step`` as an int, if it is one of the result's steps."""
    return _checked_label(ds, "step", step)


def _checked_layer(ds: xr.Dataset, layer: int) -> int:
    """``layer`` as an int, if it is one of the result's layers."""
    return _checked_label(ds, "layer", layer)


def _checked_reduce(ds: xr.Dataset, reduce: str | int) -> str | int:
    """``"best"``, ``"mean"`` or a permutation of the result (as an int)."""
    if isinstance(reduce, str) and reduce in REDUCTIONS:
        return reduce
    perms = ds["permutation"].values
    if isinstance(reduce, (int, np.integer)) and not isinstance(reduce, (bool, np.bool_)) and reduce in perms:
        return int(reduce)
    raise ValueError(f"reduce={reduce!r} is neither 'best', 'mean' nor one of the result's permutations "
                     f"{perms.tolist()}; pass one of these")


def _viewable(ds: xr.Dataset) -> list[str]:
    """Variables `gap_heatmap` can show: ``gap``, then every data variable with dims step and layer."""
    extra = [name for name in ds.data_vars if {"step", "layer"} <= set(ds[name].dims) and name != "gap"]
    first = [name for name in HEATMAP_VARIABLES if name == "gap" or name in extra]
    return first + [name for name in extra if name not in first]


def _checked_variable(ds: xr.Dataset, variable: str) -> str:
    """``variable`` if `gap_heatmap` can show it."""
    options = _viewable(ds)
    if variable not in options:
        raise ValueError(f"variable={variable!r} cannot be shown as a layer x step map; pass one of {options}")
    return variable


def _checked_tolerance(floor: float, noise_multiple: float) -> tuple[float, float]:
    """The flag settings as floats, refusing negative or non-finite ones."""
    for name, value in (("floor", floor), ("noise_multiple", noise_multiple)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r} must be a finite number >= 0 (the default is "
                             f"{FLAG_FLOOR if name == 'floor' else NOISE_MULTIPLE:g})")
    return float(floor), float(noise_multiple)


def _reduced(ds: xr.Dataset, *, variable: str = "gap", reduce: str | int = "best") -> xr.DataArray:
    """``variable`` with the permutation dim reduced: dims (step, layer[, bits]), named with long_name and units.

    ``"best"`` is the best reference: the smallest ``loss_ref`` (so the
    largest gap) or the smallest error; ``"mean"`` the mean over
    permutations; an int that permutation's value. ``gap`` is
    ``loss_model - loss_ref`` reduced that way.
    """
    _check(ds)
    variable = _checked_variable(ds, variable)
    reduce = _checked_reduce(ds, reduce)
    source = ds["loss_ref"] if variable == "gap" else ds[variable]
    if "permutation" in source.dims:
        if reduce == "best":
            source = source.min("permutation", skipna=True)
        elif reduce == "mean":
            source = source.mean("permutation", skipna=True)
        else:
            source = source.sel(permutation=reduce, drop=True)
        how = {"best": "best reference", "mean": "mean over permutations"}.get(reduce, f"permutation {reduce}")
    else:
        how = ""
    if variable == "gap":
        out = ds["loss_model"] - source
        name = {"best": "best gap", "mean": "mean gap"}.get(reduce, f"gap of permutation {reduce}")
        attrs = dict(long_name=f"{name}: trained - reference", units=NATS, diverging=1)
    else:
        out = source
        long_name = str(ds[variable].attrs.get("long_name", variable))
        attrs = dict(long_name=f"{how}: {long_name}" if how else long_name,
                     units=str(ds[variable].attrs.get("units", "")), diverging=0)
    out.name = variable
    return out.transpose(*[d for d in ("step", "layer", "bits") if d in out.dims]).assign_attrs(attrs)


def _label(da: xr.DataArray) -> str:
    units = da.attrs.get("units", "")
    return f"{da.attrs['long_name']} ({units})" if units not in ("", "1") else str(da.attrs["long_name"])


PLAIN = FuncFormatter(lambda value, _: f"{value:g}")
"""Tick labels as plain numbers (-0.1, 0.01), not mathtext powers of ten: readable, and cheap to render."""


def _stride(n: int, room_pt: float, label_pt: float) -> int:
    """Keep every k-th of ``n`` tick labels, ``label_pt`` points each, so they fit in ``room_pt`` points."""
    return max(1, math.ceil(n * label_pt / max(room_pt, 1.0)))


def _ticks(n: int, stride: int, keep: int | None = None) -> list[int]:
    ticks = list(range(0, n, stride))
    if keep is not None:
        ticks = sorted([t for t in ticks if abs(t - keep) >= stride] + [keep])
    return ticks


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
    _check(ds)
    bits = _checked_bits(ds, bits)
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    best = ds.peel.best().sel(bits=bits)
    flags = ds.peel.flagged().sel(bits=bits)
    planted = planted_layer(ds)
    layers = ds["layer"].values
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    steps = ds["step"].values
    marker = 5 if len(steps) <= 15 else 3
    for color, layer in zip(colors, layers):
        y = best.sel(layer=layer).values
        is_planted = planted is not None and planted[1] == layer
        label = f"layer {layer}" + (f" (planted {planted[0]})" if is_planted else "")
        style = dict(color=PLANTED_COLOR, lw=2.8, zorder=3) if is_planted else dict(color=color, lw=1.3)
        (line,) = ax.plot(steps, y, label=label, **style)
        hit = flags.sel(layer=layer).values
        ax.plot(steps[hit], y[hit], "o", color=line.get_color(), ms=marker, zorder=4)
        ax.plot(steps[~hit], y[~hit], "o", mfc="none", color=line.get_color(), ms=marker - 1, zorder=4)
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    values = best.values[np.isfinite(best.values)]
    top = max(2 * FLAG_FLOOR, 1.5 * values.max()) if values.size else 2 * FLAG_FLOOR
    ax.axhspan(-FLAG_FLOOR, top, color="0.92", zorder=0, lw=0)
    ax.set_yscale("symlog", linthresh=FLAG_FLOOR)
    ax.set_ylim(top=top)
    ax.set_xlabel("training step")
    ax.set_ylabel("best gap (nats/token)")
    ax.set_title(bits_phrase(bits))
    if legend:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  ncols=2 if len(layers) > 12 else 1)
    return ax


def loss_curve(ds: xr.Dataset, *, ax: Axes | None = None, label: str = "") -> Axes:
    """Held-out loss of the trained checkpoints across steps (``label`` prefixes the title)."""
    _check(ds)
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
    first = _check(next(iter(rows.values())))
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


def _heatmap_axes(ax: Axes) -> None:
    """Put the artists `_fill_heatmap` updates on ``ax``: an image, its colorbar and the flag markers."""
    image = ax.imshow(np.zeros((1, 1)), aspect="auto", origin="lower", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.06, pad=0.02)
    ax.scatter(np.empty(0), np.empty(0), marker="x", c="k", linewidths=1.0, label="flagged under-optimized")
    ax.set_xlabel("training step")
    ax.set_ylabel("layer")


def _fill_heatmap(
    ax: Axes,
    values: xr.DataArray,
    flags: np.ndarray,
    *,
    bits: float,
    floor: float,
    planted: tuple[str, int] | None,
) -> None:
    """Show ``values`` (dims layer, step) on the artists of `_heatmap_axes`, in place (no new figure).

    Colours: diverging and centred at 0 (linear within +-``floor``, logarithmic
    beyond) for gaps, sequential otherwise; NaN cells grey. ``flags`` (same
    shape, booleans) are marked with crosses. Tick labels are thinned to fit
    the axes; the planted layer's row is outlined and its label says so.
    """
    image = ax.images[0]
    marks = ax.collections[0]
    data = values.values
    n_layer, n_step = data.shape
    finite = data[np.isfinite(data)]
    if values.attrs.get("diverging"):
        linthresh = max(floor, 1e-4)
        top = max(float(np.abs(finite).max()) if finite.size else 0.0, 2 * linthresh)
        norm: Normalize = SymLogNorm(linthresh=linthresh, vmin=-top, vmax=top, base=10)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-9)
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    image.set_data(np.ma.masked_invalid(data))
    image.set_extent((-0.5, n_step - 0.5, -0.5, n_layer - 0.5))
    image.set_cmap(cmap)
    image.set_norm(norm)
    if values.attrs.get("diverging"):
        image.colorbar.formatter = PLAIN
    image.colorbar.set_label(_label(values))

    fig_w, fig_h = ax.figure.get_size_inches()
    box = ax.get_position()
    width_pt, height_pt = 72 * fig_w * box.width, 72 * fig_h * box.height
    rows, cols = np.nonzero(flags)
    marks.set_offsets(np.column_stack([cols, rows]) if rows.size else np.empty((0, 2)))
    cell = min(width_pt / n_step, height_pt / n_layer)
    marks.set_sizes([float(np.clip(0.5 * cell, 2.0, 9.0) ** 2)])

    size = FontProperties(size=plt.rcParams["xtick.labelsize"]).get_size_in_points()
    steps = values["step"].values
    chars = max(len(str(s)) for s in steps)
    xticks = _ticks(n_step, _stride(n_step, 0.9 * width_pt, size * (0.65 * chars + 1.5)))
    ax.set_xticks(xticks, [str(steps[i]) for i in xticks])
    layers = values["layer"].values.tolist()
    row = layers.index(planted[1]) if planted is not None and planted[1] in layers else None
    yticks = _ticks(n_layer, _stride(n_layer, 0.9 * height_pt, 1.8 * size), keep=row)
    ax.set_yticks(yticks, [f"{layers[i]} (planted {planted[0]})" if i == row else str(layers[i])
                           for i in yticks])
    for patch in list(ax.patches):
        patch.remove()
    if row is not None:
        ax.get_yticklabels()[yticks.index(row)].set_color(PLANTED_COLOR)
        ax.add_patch(Rectangle((-0.5, row - 0.5), n_step, 1, fill=False, ec=PLANTED_COLOR, lw=1.5, clip_on=False))
    ax.set_xlim(-0.5, n_step - 0.5)
    ax.set_ylim(-0.5, n_layer - 0.5)
    ax.set_title(f"{values.attrs['long_name']}, {bits_phrase(bits)}\n"
                 f"x: flagged under-optimized (floor {floor:g} nats)", fontsize="medium")


def gap_heatmap(
    ds: xr.Dataset,
    *,
    bits: float,
    reduce: str | int = "best",
    variable: str = "gap",
    floor: float = FLAG_FLOOR,
    noise_multiple: float = NOISE_MULTIPLE,
    ax: Axes | None = None,
) -> Axes:
    """Layer x step heatmap of the gap (or another variable) at one bit-width, flagged cells marked.

    Gaps use a diverging colormap centred at 0 (red: the reference beats the
    trained layer), linear within +-``floor`` and logarithmic beyond, so the
    first block's large gaps and the others' small ones read together. Cells
    flagged under-optimized (`PeelAccessor.flagged` with ``floor`` and
    ``noise_multiple``; the rule uses the best reference whatever ``reduce``
    shows) carry a cross; missing work is grey. The planted layer, if the run
    had one, is outlined in red.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    bits : float
        Bit-width to show (one of the result's ``bits``; 1.58 is ternary).
    reduce : {"best", "mean"} or int
        Over permutations: the best reference, the mean, or one permutation.
    variable : str
        ``"gap"`` (``loss_model - loss_ref``), ``"loss_ref"``, ``"local_err"``,
        ``"loss_model_q"``, or any other variable with dims step and layer.
    floor, noise_multiple : float
        Flag tolerance settings (nats/token; multiples of the noise floor).
    ax : matplotlib Axes, optional
        Where to draw; default a new figure sized to the data. A colorbar is
        added beside it.

    Returns
    -------
    matplotlib Axes
        The heatmap's Axes; ``ax.images[0].get_array()`` holds the values
        (rows are layers, columns steps).

    Raises
    ------
    ValueError
        For a Dataset off the schema or with an empty dimension, a bits value
        or permutation not in the data, or a variable that is not per step and layer.

    Examples
    --------
    >>> import peelnb
    >>> ds = peelnb.tutorial.example_result()
    >>> ax = peelnb.plot.gap_heatmap(ds, bits=1.58)
    >>> ax.images[0].get_array().shape
    (3, 5)
    >>> ax.images[0].colorbar.ax.get_ylabel()
    'best gap: trained - reference (nats/token)'
    """
    _check(ds)
    bits = _checked_bits(ds, bits)
    floor, noise_multiple = _checked_tolerance(floor, noise_multiple)
    values = _reduced(ds, variable=variable, reduce=reduce)
    values = values.sel(bits=bits) if "bits" in values.dims else values
    flags = ds.peel.flagged(floor=floor, noise_multiple=noise_multiple).sel(bits=bits)
    if ax is None:
        size = (float(np.clip(3.0 + 0.12 * ds.sizes["step"], 5.5, 11.0)),
                float(np.clip(1.8 + 0.22 * ds.sizes["layer"], 3.2, 8.0)))
        ax = plt.subplots(figsize=size, layout="constrained")[1]
    _heatmap_axes(ax)
    _fill_heatmap(ax, values.transpose("layer", "step"), flags.transpose("layer", "step").values,
                  bits=bits, floor=floor, planted=planted_layer(ds))
    return ax


def layer_curves(ds: xr.Dataset, *, layer: int, bits: float, ax: Axes | None = None) -> Axes:
    """One layer across training: the trained model's loss against its references' losses.

    The best reference's held-out loss (over permutations) is a line; the
    spread of all permutations (min..max) is a band around it; below 32 bits
    the trained layer naively round-to-nearest quantized (``loss_model_q``) is
    dashed. Where the reference line lies on the trained one, a cheap local
    reference matches the layer.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    layer : int
        Layer to show (0-based).
    bits : float
        Bit-width of the references.
    ax : matplotlib Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib Axes

    Raises
    ------
    ValueError
        For a Dataset off the schema or with an empty dimension, or a layer or bits value not in the data.

    Examples
    --------
    >>> import peelnb
    >>> ds = peelnb.tutorial.example_result()
    >>> ax = peelnb.plot.layer_curves(ds, layer=1, bits=4)
    >>> [line.get_label() for line in ax.lines]
    ['trained model', 'best reference', 'round-to-nearest, 4 bits']
    """
    _check(ds)
    bits = _checked_bits(ds, bits)
    layer = _checked_layer(ds, layer)
    ax = ax or plt.subplots(figsize=(5.5, 3.6), layout="constrained")[1]
    steps = ds["step"].values
    ref = ds["loss_ref"].sel(layer=layer, bits=bits)
    low, high = ref.min("permutation", skipna=True).values, ref.max("permutation", skipna=True).values
    color = "#1f77b4"
    ax.plot(steps, ds["loss_model"].values, "o-", color="k", ms=4, lw=1.5, label="trained model")
    ax.fill_between(steps, low, high, color=color, alpha=0.3, lw=0,
                    label=f"spread of {ds.sizes['permutation']} permutations (min..max)")
    ax.plot(steps, low, "o-", color=color, ms=3, lw=1.2, label="best reference")
    if bits < 32:
        ax.plot(steps, ds["loss_model_q"].sel(layer=layer, bits=bits).values, "s--", color="0.45", ms=3, lw=1,
                label=f"round-to-nearest, {bits_phrase(bits)}")
    planted = planted_layer(ds)
    note = f" (planted {planted[0]})" if planted is not None and planted[1] == layer else ""
    title = ax.set_title(f"layer {layer}{note}, references at {bits_phrase(bits)}", fontsize="medium")
    if note:
        title.set_color(PLANTED_COLOR)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize="x-small", loc="upper right")
    return ax


def _bits_tick(bits: float) -> str:
    return fmt_bits(bits).replace(" (", "\n").rstrip(")")


def bits_profile(
    ds: xr.Dataset, *, step: int, layers: Sequence[int] | None = None, ax: Axes | None = None
) -> Axes:
    """Best gap against bit-width for each layer at one step, beside the round-to-nearest baseline.

    Solid lines with dots: the best reference's gap. Dashed lines with
    squares, same colour: ``loss_model - loss_model_q``, the trained layer
    naively round-to-nearest quantized (what peeling has to beat at low bits).
    Bit-widths are categories, low to high (1.58 is labelled ternary). The y
    axis is linear within +-0.01 nats and logarithmic beyond.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    step : int
        Training step to show.
    layers : sequence of int, optional
        Layers to show (default all).
    ax : matplotlib Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib Axes
        Each layer's best-gap line is labelled ``"layer L"`` (plus the planted
        fault, if any); its baseline ``"_layer L round-to-nearest"``.

    Raises
    ------
    ValueError
        For a Dataset off the schema or with an empty dimension, or a step or layer not in the data.

    Examples
    --------
    >>> import peelnb
    >>> ds = peelnb.tutorial.example_result()
    >>> ax = peelnb.plot.bits_profile(ds, step=300)
    >>> [tick.get_text() for tick in ax.get_xticklabels()]
    ['1', '1.58\\nternary', '4', '32\\nfull']
    """
    _check(ds)
    step = _checked_step(ds, step)
    chosen = ds["layer"].values.tolist() if layers is None else [_checked_layer(ds, layer) for layer in layers]
    if not chosen:
        raise ValueError("layers is empty; pass at least one of the result's layers or None for all")
    ax = ax or plt.subplots(figsize=(5.5, 3.6), layout="constrained")[1]
    bits = np.sort(ds["bits"].values)
    x = np.arange(len(bits))
    best = ds.peel.best().sel(step=step, bits=bits)
    baseline = (ds["loss_model"] - ds["loss_model_q"]).sel(step=step, bits=bits)
    planted = planted_layer(ds)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(chosen)))
    for color, layer in zip(colors, chosen):
        is_planted = planted is not None and planted[1] == layer
        color = PLANTED_COLOR if is_planted else color
        label = f"layer {layer}" + (f" (planted {planted[0]})" if is_planted else "")
        ax.plot(x, best.sel(layer=layer).values, "o-", color=color, lw=2.5 if is_planted else 1.3, ms=4,
                label=label, zorder=3 if is_planted else 2)
        ax.plot(x, baseline.sel(layer=layer).values, "s--", color=color, lw=1, ms=3, alpha=0.8,
                label=f"_layer {layer} round-to-nearest")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_yscale("symlog", linthresh=FLAG_FLOOR)
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_xticks(x, [_bits_tick(b) for b in bits])
    ax.set_xlabel("reference bit-width (bits)")
    ax.set_ylabel("gap: trained - reference (nats/token)")
    ax.set_title(f"step {step}: best reference vs round-to-nearest", fontsize="medium")
    styles = [Line2D([], [], color="0.3", marker="o", ms=4, label="best reference"),
              Line2D([], [], color="0.3", marker="s", ms=3, ls="--", label="round-to-nearest")]
    handles = ax.get_legend_handles_labels()[0]
    ax.legend(handles=styles + handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0, ncols=2 if len(handles) > 12 else 1)
    return ax


def _layer_gap_lines(
    ds: xr.Dataset, *, layer: int, floor: float = FLAG_FLOOR, noise_multiple: float = NOISE_MULTIPLE,
    ax: Axes | None = None,
) -> Axes:
    """One layer's best gap across steps, one line per bit-width; filled markers where it is flagged."""
    _check(ds)
    layer = _checked_layer(ds, layer)
    ax = ax or plt.subplots(figsize=(5.5, 3.6), layout="constrained")[1]
    steps = ds["step"].values
    best = ds.peel.best().sel(layer=layer)
    flags = ds.peel.flagged(floor=floor, noise_multiple=noise_multiple).sel(layer=layer)
    bits = np.sort(ds["bits"].values)[::-1]
    colors = plt.get_cmap("plasma")(np.linspace(0, 0.85, len(bits)))
    marker = 5 if len(steps) <= 15 else 3
    for color, b in zip(colors, bits):
        y = best.sel(bits=b).values
        hit = flags.sel(bits=b).values
        ax.plot(steps, y, "-", color=color, lw=1.3, label=bits_phrase(b))
        ax.plot(steps[hit], y[hit], "o", color=color, ms=marker)
        ax.plot(steps[~hit], y[~hit], "o", mfc="none", color=color, ms=marker - 1)
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    ax.axhspan(-floor, floor, color="0.92", zorder=0, lw=0)
    ax.set_yscale("symlog", linthresh=max(floor, 1e-4))
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_xlabel("training step")
    ax.set_ylabel("best gap (nats/token)")
    ax.set_title(f"layer {layer}: best gap at every bit-width (filled: flagged)", fontsize="medium")
    last = best.isel(step=-1).values
    pulled_ahead = np.isfinite(last).any() and np.nanmedian(last) < -floor  # lines end low: legend above them
    ax.legend(fontsize="x-small", loc="upper right" if pulled_ahead else "lower left")
    return ax
