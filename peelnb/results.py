"""The result schema (DESIGN.md §5), atomic netCDF save/open, and the ``ds.peel`` accessor.

This module never imports torch: a saved result opens, summarizes and plots
without it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ._io import atomic_path

SCHEMA_VERSION = 1
DIMS = ("step", "layer", "permutation", "bits")
NATS = "nats/token"
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "loss_model": (("step",), "held-out loss of the checkpoint as trained", NATS),
    "loss_model_q": (("step", "layer", "bits"), "held-out loss, layer round-to-nearest quantized", NATS),
    "loss_ref": (DIMS, "held-out loss, layer replaced by its reference", NATS),
    "loss_ref_calib": (DIMS, "calibration loss, layer replaced by its reference", NATS),
    "local_err": (DIMS, "relative error of the reference's output", "1"),
    "solve_seconds": (DIMS, "wall time of the local solve (batched, per reference)", "s"),
    "loss_ablate": (("step", "layer"), "held-out loss, layer replaced by the identity", NATS),
}
COORD_ATTRS = {
    "step": ("training step", "steps"),
    "layer": ("layer (0-based)", "1"),
    "permutation": ("solver ordering", "1"),
    "bits": ("reference bit-width", "bits"),
}
FLAG_FLOOR = 0.01
"""Absolute tolerance (nats/token) of the flag rule; see `flagged`."""
NOISE_MULTIPLE = 1.0
"""How many noise floors (spread over permutations) the flag tolerance spans at least."""


def new_dataset(
    steps: list[int],
    layers: list[int],
    permutations: list[int],
    bits: list[float],
    *,
    attrs: dict[str, Any],
    layer_names: list[str] | None = None,
) -> xr.Dataset:
    """An empty result (every variable NaN) with the schema's dims, coords and attributes."""
    coords: dict[str, Any] = {
        "step": np.asarray(steps, dtype=np.int64),
        "layer": np.asarray(layers, dtype=np.int64),
        "permutation": np.asarray(permutations, dtype=np.int64),
        "bits": np.asarray(bits, dtype=np.float64),
    }
    ds = xr.Dataset(coords=coords)
    for name, (dims, long_name, units) in VARIABLES.items():
        shape = tuple(len(coords[d]) for d in dims)
        ds[name] = xr.DataArray(np.full(shape, np.nan), dims=dims, attrs={"long_name": long_name, "units": units})
    for name, (long_name, units) in COORD_ATTRS.items():
        ds[name].attrs.update(long_name=long_name, units=units)
    if layer_names is not None:
        ds = ds.assign_coords(layer_name=("layer", np.asarray(layer_names, dtype=str)))
    ds.attrs.update(
        schema_version=SCHEMA_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **attrs,
    )
    return ds


def validate(ds: xr.Dataset) -> xr.Dataset:
    """Check that ``ds`` follows the result schema; return it unchanged.

    Raises
    ------
    ValueError
        Naming each missing variable or dimension, or a wrong schema version.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"expected an xarray.Dataset of peel results, got {type(ds).__name__}")
    problems = [f"dimension {d!r} is missing" for d in DIMS if d not in ds.dims]
    for name, (dims, _, _) in VARIABLES.items():
        if name not in ds:
            problems.append(f"variable {name!r} is missing")
        elif ds[name].dims != dims:
            problems.append(f"variable {name!r} has dims {ds[name].dims}, expected {dims}")
    version = ds.attrs.get("schema_version")
    if version is not None and int(version) != SCHEMA_VERSION:
        problems.append(f"schema_version is {version}, this peelnb reads {SCHEMA_VERSION}")
    if problems:
        raise ValueError("not a peelnb result: " + "; ".join(problems))
    return ds


def _netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes netCDF stores exactly: str, int and float as given; anything else is an error."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float)):
            raise TypeError(f"attribute {key!r} is a {type(value).__name__}; store str, int or float (json.dumps a dict)")
        out[key] = str(value) if isinstance(value, str) else value
    return out


def save(ds: xr.Dataset, path: str | Path) -> Path:
    """Write a result to one netCDF file, atomically.

    The file is written beside ``path`` and renamed over it only when
    complete, so an interrupted save leaves the previous file intact.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    path : str or Path
        Target ``.nc`` file.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import peelnb, tempfile, os
    >>> ds = peelnb.tutorial.example_result()
    >>> path = peelnb.save(ds, os.path.join(tempfile.mkdtemp(), "peel.nc"))
    >>> peelnb.open(path).identical(ds)
    True
    """
    validate(ds)
    path = Path(path)
    out = ds.copy()
    out.attrs = _netcdf_attrs(ds.attrs)
    with atomic_path(path) as tmp:
        out.to_netcdf(tmp, engine="h5netcdf")
    return path


def open(path: str | Path) -> xr.Dataset:  # noqa: A001 - public name, like xarray's open_dataset
    """Open a saved result fully into memory (the file is closed again).

    Parameters
    ----------
    path : str or Path
        A file written by `save` (or by ``peel(..., out=path)``).

    Returns
    -------
    xarray.Dataset
        The result, validated against the schema.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a peelnb result.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {str(path)!r} does not exist")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as handle:
            ds = handle.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a netCDF file peelnb can read ({err})") from None
    return validate(ds)


def _first_block_scale(ds: xr.Dataset) -> xr.DataArray:
    """Per-(step, layer) scale: 1, except the first block, scaled by its ablation cost over the others' median.

    The first block dominates gradients, perturbations and ablations (its cost
    is often 10-30x the others'), so it is judged on its own scale.
    """
    cost = (ds["loss_ablate"] - ds["loss_model"]).clip(min=0)
    scale = xr.ones_like(cost)
    if ds.sizes["layer"] > 1 and int(ds["layer"][0]) == 0:
        others = cost.isel(layer=slice(1, None)).median("layer")
        ratio = (cost.isel(layer=0) / others).where(others > 0).fillna(1.0).clip(min=1.0)
        scale[dict(layer=0)] = ratio
    return scale


@xr.register_dataset_accessor("peel")
class PeelAccessor:
    """``ds.peel``: derived quantities of a peel result (DESIGN.md §5).

    ``gap = loss_model - loss_ref``: positive means the reference is better
    than the trained layer.
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def gap(self) -> xr.DataArray:
        """Gap of every reference, (step, layer, permutation, bits), nats/token."""
        ds = validate(self._ds)
        gap = ds["loss_model"] - ds["loss_ref"]
        return gap.assign_attrs(long_name="gap (trained - reference)", units=NATS)

    def best(self) -> xr.DataArray:
        """Best gap over permutations (the best achievable reference), (step, layer, bits)."""
        best = self._ds["loss_model"] - self._ds["loss_ref"].min("permutation", skipna=True)
        return best.assign_attrs(long_name="best gap (trained - best reference)", units=NATS)

    def noise(self) -> xr.DataArray:
        """Noise floor: spread (max - min) of ``loss_ref`` over permutations, (step, layer, bits)."""
        ref = validate(self._ds)["loss_ref"]
        spread = ref.max("permutation", skipna=True) - ref.min("permutation", skipna=True)
        return spread.assign_attrs(long_name="noise floor (spread over permutations)", units=NATS)

    def tolerance(self, *, floor: float = FLAG_FLOOR, noise_multiple: float = NOISE_MULTIPLE) -> xr.DataArray:
        """Flag tolerance, (step, layer, bits): the larger of ``floor`` and ``noise_multiple`` noise floors.

        Each layer's noise floor is its own. Where references start from the
        trained layer (headroom view) the gap is a gain that grows with the
        layer's influence, so the first block's floor is scaled by its own
        ablation cost relative to the other blocks' median.
        """
        floor_da = floor * _first_block_scale(self._ds) if self._ds.attrs.get("init") == "trained" else floor
        tol = xr.apply_ufunc(np.fmax, xr.zeros_like(self.noise()) + floor_da, noise_multiple * self.noise())
        return tol.assign_attrs(long_name="flag tolerance", units=NATS)

    def flagged(self, *, floor: float = FLAG_FLOOR, noise_multiple: float = NOISE_MULTIPLE) -> xr.DataArray:
        """Under-optimized layers, (step, layer, bits) booleans.

        From scratch (replace view) a layer is flagged when its best reference
        matches or beats it: ``best > -tolerance``. Starting from the trained
        layer (headroom view), matching is free, so it is flagged only when the
        reference beats it: ``best > +tolerance``. Missing work is never flagged.

        Parameters
        ----------
        floor : float
            Absolute tolerance in nats/token (see `tolerance`).
        noise_multiple : float
            The tolerance is at least this many noise floors.
        """
        best = self.best()
        tol = self.tolerance(floor=floor, noise_multiple=noise_multiple)
        threshold = tol if self._ds.attrs.get("init") == "trained" else -tol
        flags = (best > threshold) & best.notnull()
        return flags.assign_attrs(long_name="under-optimized")

    def summary(
        self,
        *,
        step: int | None = None,
        bits: float | None = None,
        n: int | None = None,
        floor: float = FLAG_FLOOR,
        noise_multiple: float = NOISE_MULTIPLE,
    ) -> pd.DataFrame:
        """Table of layers ranked from most to least under-optimized.

        Within each (step, bits), flagged layers come first, then layers are
        ordered by their best gap on their own scale (the ``score``: the first
        block's gap divided by its ablation cost relative to the other
        blocks' median, everyone else's gap as is); rank 1 is the most
        under-optimized. Layers with no result come last.

        Parameters
        ----------
        step : int, optional
            Training step to report; default the last step with results.
        bits : float, optional
            Only this bit-width; default all.
        n : int, optional
            Keep the top ``n`` layers of each bit-width.
        floor, noise_multiple : float
            Flag tolerance settings, as in `flagged`.

        Returns
        -------
        pandas.DataFrame
            Columns step, bits, rank, layer, gap, score, noise, tolerance,
            flagged, loss_model, loss_ref, loss_model_q, local_err.
        """
        ds = validate(self._ds)
        done = ds["step"].values[ds["loss_ref"].notnull().any(("layer", "permutation", "bits")).values]
        if step is None:
            if not len(done):
                raise ValueError("the result holds no computed step yet")
            step = int(done[-1])
        if step not in ds["step"].values:
            raise ValueError(f"step {step} is not in the result; steps: {ds['step'].values.tolist()}")
        if bits is not None:
            bits = float(bits)
            if not np.isclose(ds["bits"].values, bits).any():
                raise ValueError(f"bits={bits:g} is not in the result; bits: {ds['bits'].values.tolist()}")
            bits = float(ds["bits"].values[np.isclose(ds["bits"].values, bits)][0])
        at = dict(step=step) if bits is None else dict(step=step, bits=bits)
        best = self.best().sel(at)
        table = xr.Dataset(
            {
                "gap": best,
                "score": best / _first_block_scale(ds).sel(step=step),
                "noise": self.noise().sel(at),
                "tolerance": self.tolerance(floor=floor, noise_multiple=noise_multiple).sel(at),
                "flagged": self.flagged(floor=floor, noise_multiple=noise_multiple).sel(at),
                "loss_model": ds["loss_model"].sel(step=step),
                "loss_ref": ds["loss_ref"].min("permutation").sel(at),
                "loss_model_q": ds["loss_model_q"].sel(at),
                "local_err": ds["local_err"].min("permutation").sel(at),
            }
        )
        frame = table.drop_vars([c for c in table.coords if c not in ("layer", "bits")]).to_dataframe().reset_index()
        frame.insert(0, "step", step)
        if "bits" not in frame:
            frame.insert(1, "bits", bits)
        frame = frame.sort_values(["bits", "flagged", "score"], ascending=[False, False, False], na_position="last")
        frame["rank"] = (frame.groupby("bits").cumcount() + 1).where(frame["score"].notna())
        if n is not None:
            frame = frame.groupby("bits", sort=False).head(n)
        columns = ["step", "bits", "rank", "layer", "gap", "score", "noise", "tolerance", "flagged",
                   "loss_model", "loss_ref", "loss_model_q", "local_err"]
        frame = frame[columns].reset_index(drop=True)
        frame["rank"] = frame["rank"].astype("Int64")
        frame["flagged"] = frame["flagged"].astype(bool)
        return frame

    def settings(self) -> dict[str, Any]:
        """The peel settings recorded in the attributes, JSON fields decoded."""
        out = dict(self._ds.attrs)
        for key, value in out.items():
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    out[key] = json.loads(value)
                except ValueError:
                    pass
        return out


def fmt_bits(bits: float) -> str:
    """Human label of a bit-width: '32 (full)', '1.58 (ternary)', '4'."""
    if math.isclose(bits, 32):
        return "32 (full)"
    if math.isclose(bits, 1.58):
        return "1.58 (ternary)"
    return f"{bits:g}"
