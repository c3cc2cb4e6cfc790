"""Interactive viewer of peel results in Jupyter (ipywidgets), built on `peelnb.plot`. Never imports torch.

`explore` returns an `Explorer`: a widget whose state is traitlets
(``variable``, ``bits``, ``reduce``, ``step_range``, ``floor``,
``noise_multiple``, ``layer``). Setting a trait from Python, or its control
in the notebook, redraws what depends on it; ``flagged``, ``table`` and
``plotted`` say what is shown, so it is testable without a browser.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import traitlets
import xarray as xr
from matplotlib.figure import Figure

import peelnb

from . import plot
from .results import FLAG_FLOOR, NOISE_MULTIPLE, bits_phrase, fmt_bits

HEATMAP, CURVES, GAPS, TABLE = "heatmap", "curves", "gaps", "table"
EVERYTHING = {HEATMAP, CURVES, GAPS, TABLE}
AFFECTS = {
    "variable": {HEATMAP},
    "reduce": {HEATMAP},
    "bits": {HEATMAP, CURVES, TABLE},
    "step_range": EVERYTHING,
    "floor": {HEATMAP, GAPS, TABLE},
    "noise_multiple": {HEATMAP, GAPS, TABLE},
    "layer": {CURVES, GAPS},
}
"""Which parts of the viewer each trait redraws."""
KEEP_LAYOUT = {"bits", "floor", "noise_multiple"}
"""Traits whose change leaves the heatmap's labels as they are, so its layout is kept (a faster redraw)."""
TABLE_COLUMNS = ["layer", "flagged_steps", "first_step", "last_step", "last_gap", "planted"]


def _png(fig: Figure, *, layout: bool = True) -> bytes:
    """Render ``fig`` to PNG; with ``layout`` False, keep the positions of the last layout (faster)."""
    fig.set_layout_engine("constrained" if layout else "none")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


class Explorer(widgets.VBox):
    """A widget to slice a peel result: a layer x step heatmap, a per-layer panel and a flagged-layers table.

    Create it with `explore`. Every control is a trait: setting
    ``viewer.bits = 1.58`` (or picking 1.58 in its dropdown) redraws the
    heatmap, the layer panel and the table. Figures are drawn once and
    updated in place, then rendered to PNG images in the widget.

    Parameters
    ----------
    data : xarray.Dataset, str or path
        A peel result, or the path of a result file or store.
    variable, bits, reduce, step_range, floor, noise_multiple, layer
        Initial settings, as in `explore`.
    dpi : int
        Resolution of the rendered images.

    Attributes
    ----------
    variable : str
        What the heatmap shows: ``"gap"``, ``"loss_ref"``, ``"local_err"``,
        ``"loss_model_q"`` or another variable with dims step and layer.
    bits : float
        Bit-width shown (one of the result's).
    reduce : {"best", "mean"} or int
        Over permutations: best reference, mean, or one permutation.
    step_range : tuple of int
        First and last step shown (inclusive); set values snap to the steps
        inside, ``None`` for an open end.
    floor, noise_multiple : float
        Flag tolerance: max(``floor``, ``noise_multiple`` x noise floor), nats/token.
    layer : int
        Layer of the per-layer panel.
    source : Path or None
        The file or store `refresh` re-opens; None for a Dataset.
    """

    variable = traitlets.Unicode("gap")
    bits = traitlets.CFloat(32.0)
    reduce = traitlets.Any("best")
    step_range = traitlets.Tuple()
    floor = traitlets.CFloat(FLAG_FLOOR)
    noise_multiple = traitlets.CFloat(NOISE_MULTIPLE)
    layer = traitlets.Any(0)

    def __init__(
        self,
        data: xr.Dataset | str | os.PathLike[str],
        *,
        variable: str = "gap",
        bits: float | None = None,
        reduce: str | int = "best",
        step_range: tuple[int | None, int | None] | None = None,
        floor: float = FLAG_FLOOR,
        noise_multiple: float = NOISE_MULTIPLE,
        layer: int | None = None,
        dpi: int = 90,
    ) -> None:
        super().__init__()
        self._ds = self._read(data)
        self.source: Path | None = None if isinstance(data, xr.Dataset) else Path(os.fspath(data))
        self._cache: dict[tuple[Any, ...], xr.DataArray] = {}
        self._plotted: xr.DataArray | None = None
        self._held = True
        self._links: list[traitlets.link] = []
        self._build(dpi)
        self.variable = variable
        self.reduce = reduce
        self.bits = self._default_bits() if bits is None else bits
        self.step_range = (None, None) if step_range is None else step_range
        self.floor = floor
        self.noise_multiple = noise_multiple
        self.layer = self._default_layer() if layer is None else layer
        self._sync_controls()
        self._held = False
        self._redraw(EVERYTHING)

    # ----- data -----------------------------------------------------------------------------------------------
    @staticmethod
    def _read(data: xr.Dataset | str | os.PathLike[str]) -> xr.Dataset:
        if isinstance(data, xr.Dataset):
            return plot._check(data)
        if isinstance(data, (str, os.PathLike)):
            return plot._check(peelnb.open(data))
        raise TypeError(f"explore takes a peel result (xarray.Dataset) or the path of a result file or store, "
                        f"got {type(data).__name__}")

    @property
    def data(self) -> xr.Dataset:
        """The whole result the viewer holds (as last read)."""
        return self._ds

    def _default_bits(self) -> float:
        values = self._ds["bits"].values
        return 32.0 if np.isclose(values, 32).any() else float(values.max())

    def _default_layer(self) -> int:
        planted = plot.planted_layer(self._ds)
        layers = self._ds["layer"].values
        if planted is not None and planted[1] in layers:
            return planted[1]
        counts = self._all_flags().sel(bits=self.bits).sum("step")
        return int(layers[int(counts.values.argmax())])

    def _cached(self, key: tuple[Any, ...], compute: Any) -> xr.DataArray:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _all_flags(self) -> xr.DataArray:
        """Flags of every (step, layer, bits) at the current tolerance, computed once per tolerance."""
        return self._cached(("flags", self.floor, self.noise_multiple),
                            lambda: self._ds.peel.flagged(floor=self.floor, noise_multiple=self.noise_multiple))

    def _steps(self) -> slice:
        return slice(*self.step_range)

    def _flags(self) -> xr.DataArray:
        """Flags shown now: (step, layer) at ``bits`` within ``step_range``."""
        return self._all_flags().sel(bits=self.bits, step=self._steps())

    def _values(self) -> xr.DataArray:
        """What the heatmap shows now: (layer, step) at ``bits`` within ``step_range``."""
        values = self._cached(("values", self.variable, self.reduce),
                              lambda: plot._reduced(self._ds, variable=self.variable, reduce=self.reduce))
        values = values.sel(bits=self.bits) if "bits" in values.dims else values
        return values.sel(step=self._steps()).transpose("layer", "step")

    @property
    def plotted(self) -> xr.DataArray:
        """The 2-D array (layer, step) the heatmap shows now, with its long_name and units."""
        assert self._plotted is not None
        return self._plotted

    @property
    def flagged(self) -> list[tuple[int, int]]:
        """Flagged (step, layer) pairs at the current bits, step range and tolerance, by step then layer."""
        flags = self._flags()
        rows, cols = np.nonzero(flags.transpose("step", "layer").values)
        steps, layers = flags["step"].values, flags["layer"].values
        return [(int(steps[i]), int(layers[j])) for i, j in zip(rows, cols)]

    @property
    def table(self) -> pd.DataFrame:
        """Flagged layers at the current bits and step range, most often flagged first.

        Columns: ``layer``; ``flagged_steps`` (how many shown steps flag it);
        ``first_step``/``last_step`` (first and last flagged step);
        ``last_gap`` (best gap at the last shown step, nats/token); ``planted``.
        """
        flags = self._flags().transpose("layer", "step")
        counts = flags.sum("step").values
        steps = flags["step"].values
        best = self._cached(("values", "gap", "best"), lambda: plot._reduced(self._ds))
        last_gap = best.sel(bits=self.bits, step=steps[-1]).values
        planted = plot.planted_layer(self._ds)
        rows = [
            dict(layer=int(layer), flagged_steps=int(counts[i]), first_step=int(steps[hits][0]),
                 last_step=int(steps[hits][-1]), last_gap=float(last_gap[i]),
                 planted=planted is not None and planted[1] == layer)
            for i, (layer, hits) in enumerate(zip(flags["layer"].values, flags.values))
            if counts[i]
        ]
        frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return frame.sort_values(["flagged_steps", "last_gap"], ascending=False).reset_index(drop=True)

    # ----- trait validation and updates ------------------------------------------------------------------------
    @traitlets.validate("variable")
    def _valid_variable(self, proposal: dict[str, Any]) -> str:
        return plot._checked_variable(self._ds, proposal["value"])

    @traitlets.validate("bits")
    def _valid_bits(self, proposal: dict[str, Any]) -> float:
        return plot._checked_bits(self._ds, proposal["value"])

    @traitlets.validate("reduce")
    def _valid_reduce(self, proposal: dict[str, Any]) -> str | int:
        return plot._checked_reduce(self._ds, proposal["value"])

    @traitlets.validate("layer")
    def _valid_layer(self, proposal: dict[str, Any]) -> int:
        return plot._checked_layer(self._ds, proposal["value"])

    @traitlets.validate("floor", "noise_multiple")
    def _valid_tolerance(self, proposal: dict[str, Any]) -> float:
        name = proposal["trait"].name
        floor, multiple = (proposal["value"], 0.0) if name == "floor" else (0.0, proposal["value"])
        return plot._checked_tolerance(floor, multiple)[0 if name == "floor" else 1]

    @traitlets.validate("step_range")
    def _valid_step_range(self, proposal: dict[str, Any]) -> tuple[int, int]:
        value = tuple(proposal["value"])
        steps = self._ds["step"].values
        if len(value) != 2:
            raise ValueError(f"step_range={value!r} must be a pair (first, last) of steps; None leaves an end open")
        low = steps[0] if value[0] is None else value[0]
        high = steps[-1] if value[1] is None else value[1]
        inside = steps[(steps >= low) & (steps <= high)]
        if not inside.size:
            raise ValueError(f"step_range={value!r} selects no step (an empty selection); the result's steps run "
                             f"{steps[0]}..{steps[-1]}: pass a range that holds at least one of them")
        return int(inside[0]), int(inside[-1])

    @traitlets.observe(*AFFECTS)
    def _changed(self, change: dict[str, Any]) -> None:
        self._redraw(AFFECTS[change["name"]], layout=change["name"] not in KEEP_LAYOUT)

    # ----- layout and drawing ---------------------------------------------------------------------------------
    def _build(self, dpi: int) -> None:
        """Create the controls, the two figures (drawn into once, then updated) and the layout."""
        wide = {"description_width": "initial"}
        self.controls: dict[str, widgets.ValueWidget] = {
            "variable": widgets.Dropdown(description="show", style=wide),
            "reduce": widgets.Dropdown(description="permutations", style=wide),
            "bits": widgets.Dropdown(description="bits", style=wide, layout=widgets.Layout(width="170px")),
            "step_range": widgets.SelectionRangeSlider(options=self._step_options(), description="steps",
                                                       continuous_update=False, style=wide,
                                                       layout=widgets.Layout(width="420px")),
            "floor": widgets.BoundedFloatText(min=0.0, max=10.0, step=0.005, description="flag floor (nats)",
                                              style=wide, layout=widgets.Layout(width="190px")),
            "noise_multiple": widgets.BoundedFloatText(min=0.0, max=100.0, step=0.5, description="x noise floor",
                                                       style=wide, layout=widgets.Layout(width="160px")),
            "layer": widgets.Dropdown(description="layer", style=wide),
        }
        self.refresh_button = widgets.Button(description="refresh", icon="refresh",
                                             tooltip="re-open the result file or store and show new steps")
        self.refresh_button.on_click(lambda _: self.refresh())
        n_step, n_layer = self._ds.sizes["step"], self._ds.sizes["layer"]
        size = (float(np.clip(3.5 + 0.1 * n_step, 6.5, 9.0)), float(np.clip(2.0 + 0.2 * n_layer, 3.4, 6.5)))
        self.figure = Figure(figsize=size, dpi=dpi, layout="constrained")
        plot._heatmap_axes(self.figure.add_subplot())
        self.curves_figure = Figure(figsize=(5.6, 3.6), dpi=dpi)
        self.gaps_figure = Figure(figsize=(5.6, 3.6), dpi=dpi)
        for fig in (self.curves_figure, self.gaps_figure):  # fixed margins: labels here keep their size
            fig.add_subplot()
            fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.91)
        self.heatmap_image = widgets.Image(format="png")
        self.curves_image = widgets.Image(format="png")
        self.gaps_image = widgets.Image(format="png")
        self.table_html = widgets.HTML()
        self.status = widgets.HTML()
        c = self.controls
        self.children = [
            self.status,
            widgets.HBox([c["variable"], c["reduce"], c["bits"]]),
            widgets.HBox([c["step_range"], c["floor"], c["noise_multiple"], self.refresh_button]),
            widgets.HBox([self.heatmap_image, self.table_html]),
            c["layer"],
            widgets.HBox([self.curves_image, self.gaps_image]),
        ]

    def _step_options(self) -> list[tuple[str, int]]:
        return [(str(step), int(step)) for step in self._ds["step"].values]

    def _unlink(self) -> None:
        for link in self._links:
            link.unlink()
        self._links = []

    def _sync_controls(self) -> None:
        """Point the controls at the current data's options and link them to the traits."""
        self._unlink()
        ds, c = self._ds, self.controls
        planted = plot.planted_layer(ds)
        c["variable"].options = plot._viewable(ds)
        c["reduce"].options = [("best", "best"), ("mean", "mean")] + [
            (f"permutation {p}", int(p)) for p in ds["permutation"].values]
        c["bits"].options = [(fmt_bits(b), float(b)) for b in np.sort(ds["bits"].values)[::-1]]
        c["step_range"].options = self._step_options()
        c["layer"].options = [
            (f"{layer} (planted {planted[0]})" if planted is not None and planted[1] == layer else str(layer),
             int(layer)) for layer in ds["layer"].values]
        self._links = [traitlets.link((self, name), (control, "value")) for name, control in c.items()]
        source = f"<code>{self.source}</code>" if self.source is not None else "a Dataset in memory"
        self.status.value = (
            f"<b>peelnb explorer</b>: {ds.sizes['step']} steps ({int(ds['step'][0])}..{int(ds['step'][-1])}) x "
            f"{ds.sizes['layer']} layers x {ds.sizes['permutation']} permutations x {ds.sizes['bits']} bit-widths, "
            f"{ds.attrs.get('view', 'replace')} view; from {source}")

    def _redraw(self, parts: set[str], *, layout: bool = True) -> None:
        """Redraw the named parts from the current traits (figures are reused, only their artists change).

        With ``layout`` False the heatmap keeps its last layout (its labels did not change).
        """
        if self._held:
            return
        if HEATMAP in parts:
            values = self._values()
            plot._fill_heatmap(self.figure.axes[0], values, self._flags().transpose("layer", "step").values,
                               bits=self.bits, floor=self.floor, planted=plot.planted_layer(self._ds))
            self._plotted = values
            self.heatmap_image.value = _png(self.figure, layout=layout)
        if TABLE in parts:
            self.table_html.value = self._table_html()
        shown = self._ds.sel(step=self._steps())
        if CURVES in parts:
            ax = self.curves_figure.axes[0]
            ax.clear()
            plot.layer_curves(shown, layer=self.layer, bits=self.bits, ax=ax)
            self.curves_image.value = _png(self.curves_figure, layout=False)
        if GAPS in parts:
            ax = self.gaps_figure.axes[0]
            ax.clear()
            plot._layer_gap_lines(shown, layer=self.layer, floor=self.floor, noise_multiple=self.noise_multiple,
                                  ax=ax)
            self.gaps_image.value = _png(self.gaps_figure, layout=False)

    def _table_html(self) -> str:
        table = self.table
        low, high = self.step_range
        head = (f"<b>Flagged layers</b>: {len(table)} of {self._ds.sizes['layer']} at {bits_phrase(self.bits)}, "
                f"steps {low}..{high}")
        if table.empty:
            return f"<div>{head}</div>"
        shown = table.assign(planted=table["planted"].map({True: "planted", False: ""})).rename(columns={
            "flagged_steps": "flagged steps", "first_step": "first", "last_step": "last",
            "last_gap": f"gap at {high}"})
        body = shown.to_html(index=False, border=0, justify="right", classes="peelnb-flagged",
                             float_format=lambda v: f"{v:+.4f}")
        style = ("<style>.peelnb-flagged th, .peelnb-flagged td {text-align: right; padding: 1px 8px;}"
                 "</style>")
        return f"<div style='max-height:420px;overflow-y:auto;font-size:90%'>{style}{head}{body}</div>"

    # ----- actions --------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-open the source (result file or growing store) and show it; new steps join the range.

        If the step range reached the last step, it extends to the new last
        step. Settings no longer valid in the new data fall back to defaults.
        With a Dataset as source, redraws it as it is now (it may have been
        filled in place).
        """
        if self.source is not None:
            ds = self._read(self.source)
        else:
            ds = plot._check(self._ds)
        follow = self.step_range[1] == int(self._ds["step"][-1])
        self._held = True
        self._unlink()  # the controls still hold the old options until _sync_controls
        try:
            self._ds = ds
            self._cache.clear()
            if not np.isclose(ds["bits"].values, self.bits).any():
                self.bits = self._default_bits()
            if self.layer not in ds["layer"].values:
                self.layer = self._default_layer()
            if self.variable not in plot._viewable(ds):
                self.variable = "gap"
            if self.reduce not in ("best", "mean") and self.reduce not in ds["permutation"].values:
                self.reduce = "best"
            low, high = self.step_range
            try:
                self.step_range = (low, None if follow else high)
            except ValueError:
                self.step_range = (None, None)
            self._sync_controls()
        finally:
            self._held = False
        self._redraw(EVERYTHING)


def explore(
    data: xr.Dataset | str | os.PathLike[str],
    *,
    variable: str = "gap",
    bits: float | None = None,
    reduce: str | int = "best",
    step_range: tuple[int | None, int | None] | None = None,
    floor: float = FLAG_FLOOR,
    noise_multiple: float = NOISE_MULTIPLE,
    layer: int | None = None,
) -> Explorer:
    """An interactive viewer of a peel result; displays itself in Jupyter.

    Controls: what to show (gap, reference loss, local error, round-to-nearest
    loss), bit-width, permutation reduction (best, mean, one permutation),
    step range, flag tolerance (floor and noise multiple), and the layer of
    the per-layer panel (its losses against its references', and its best gap
    at every bit-width across steps). A table lists the flagged layers; the
    refresh button re-opens a file or growing store and shows new steps.

    Parameters
    ----------
    data : xarray.Dataset, str or path
        A peel result, or the path of a result file or store (re-read by refresh).
    variable : str
        What the heatmap shows first (see `peelnb.plot.gap_heatmap`).
    bits : float, optional
        Bit-width shown first; default 32 if present, else the largest.
    reduce : {"best", "mean"} or int
        Reduction over permutations.
    step_range : (int or None, int or None), optional
        First and last step shown; default all.
    floor, noise_multiple : float
        Flag tolerance settings.
    layer : int, optional
        Layer of the per-layer panel; default the planted layer, else the most flagged.

    Returns
    -------
    Explorer
        The widget; its traits (``viewer.bits = 1.58``) drive it from Python.

    Raises
    ------
    ValueError
        For a result off the schema or with an empty dimension, or a setting not in the data.
    TypeError
        If ``data`` is neither a Dataset nor a path.

    Examples
    --------
    >>> import peelnb
    >>> viewer = peelnb.explore(peelnb.tutorial.example_result(), bits=32)
    >>> viewer.flagged[:3]
    [(0, 0), (0, 1), (0, 2)]
    >>> viewer.bits = 1.58
    >>> viewer.plotted.sel(layer=1).values.round(4).tolist()
    [-0.0002, 0.0003, 0.0002, 0.0001, 0.0002]
    """
    return Explorer(data, variable=variable, bits=bits, reduce=reduce, step_range=step_range, floor=floor,
                    noise_multiple=noise_multiple, layer=layer)
