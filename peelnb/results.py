"""The result schema (DESIGN.md §5), atomic save/open of netCDF files and Zarr stores, and the ``ds.peel`` accessor.

This module never imports torch: a saved result opens, summarizes and plots
without it.

Zarr stores
-----------
A path ending in ``.zarr`` is a Zarr store that grows along ``step`` while a
run trains (`append_step`). It is one ordinary store, written by xarray in
Zarr format 2 (read by zarr 2 and 3 and by plain ``xarray.open_zarr``): one
array per variable, one chunk per step, and consolidated metadata. The
consolidated metadata is the store's commit record:

1. readers (`open`, ``xarray.open_zarr``) take the arrays' shapes from it, so
   they see exactly the committed steps, whatever else is on disk;
2. an append resizes every array along ``step`` to the committed length plus
   the new steps, writes the new steps' chunks (new files: the chunks of
   committed steps are never rewritten), and rewrites the consolidated
   metadata last (one file, replaced atomically): that write commits them;
3. a crash before that write leaves the committed steps readable and
   unchanged; the next append starts again from the committed length and
   overwrites or trims whatever the crashed one wrote.

Steps already in the store are skipped: their committed values stay, since
rewriting a chunk in place could not be atomic. Steps that sort before the
store's last step are merged in by rewriting the whole store into a new
folder that is then swapped in (`save`), so steps stay sorted. Per-step
sub-stores renamed into place would be atomic too, but only peelnb could
assemble them; this layout keeps every Zarr reader working. One process
appends to a store at a time; any number may read it meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ._io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

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
OPTIONAL_VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "grad_norm": (("step", "layer"), "relative gradient norm of the training loss, ||grad|| / ||weights||", "1"),
    "weight_change": (("step", "layer"), "relative weight change since the previous checkpoint", "1"),
    "alpha": (("step", "layer"), "heavy-tail exponent of the weight spectrum (mean over the block's matrices)", "1"),
}
"""Baselines ``peel(..., baselines=True)`` adds (`peelnb.baselines`); a result may hold them or not."""
RANKINGS: dict[str, tuple[str, str]] = {
    "gap": ("larger", "best gap on the layer's own scale, flagged layers first: the reference matches or beats it"),
    "ablation": ("smaller", "loss_ablate - loss_model: a layer whose removal costs little contributes little"),
    "alpha": ("larger", "a thinner-tailed weight spectrum: less trained, in WeightWatcher's reading"),
    "grad_norm": ("smaller", "a smaller gradient relative to the weights: the rest of the network has stopped using "
                  "the layer (measured: frozen, slow and reset layers have the smallest; docs/detection.md)"),
    "weight_change": ("smaller", "a smaller update since the previous checkpoint: the layer moves less"),
}
"""What `PeelAccessor.summary` can rank by: the direction that ranks a layer as more under-optimized, and why."""
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
    optional: tuple[str, ...] = (),
) -> xr.Dataset:
    """An empty result (every variable NaN) with the schema's dims, coords and attributes.

    ``optional`` names variables of `OPTIONAL_VARIABLES` to add (also NaN).
    """
    coords: dict[str, Any] = {
        "step": np.asarray(steps, dtype=np.int64),
        "layer": np.asarray(layers, dtype=np.int64),
        "permutation": np.asarray(permutations, dtype=np.int64),
        "bits": np.asarray(bits, dtype=np.float64),
    }
    ds = xr.Dataset(coords=coords)
    unknown = sorted(set(optional) - set(OPTIONAL_VARIABLES))
    if unknown:
        raise ValueError(f"unknown optional variables {unknown}; known: {sorted(OPTIONAL_VARIABLES)}")
    schema = {**VARIABLES, **{name: OPTIONAL_VARIABLES[name] for name in optional}}
    for name, (dims, long_name, units) in schema.items():
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
    for name, (dims, _, _) in OPTIONAL_VARIABLES.items():
        if name in ds and ds[name].dims != dims:
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
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (str, int, float)):
            raise TypeError(f"attribute {key!r} is a {type(value).__name__}; "
                            "store str, int or float (json.dumps a dict)")
        out[key] = str(value) if isinstance(value, str) else value
    return out


ZARR_SUFFIX = ".zarr"
ZARR_EXTRA = 'pip install "peelnb[zarr]"'
VOLATILE_ATTRS = ("created", "peelnb_version", "torch_version")
"""Attributes that may differ between a Zarr store and the steps appended to it."""


def require_zarr() -> ModuleType:
    """The zarr module, or an ImportError naming the extra to install."""
    try:
        import zarr
    except ImportError:
        raise ImportError(f"Zarr result stores need the zarr package: {ZARR_EXTRA}") from None
    return zarr


def _zarr_v3(zarr: ModuleType) -> bool:
    return int(zarr.__version__.split(".")[0]) >= 3


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` names a Zarr store: a ``.zarr`` suffix, or a folder holding Zarr metadata."""
    path = Path(path)
    return path.suffix == ZARR_SUFFIX or (
        path.is_dir() and any((path / key).is_file() for key in (".zgroup", "zarr.json"))
    )


def _for_storage(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy with attributes a file stores exactly and no encoding carried over from another file."""
    out = ds.copy()
    out.attrs = _netcdf_attrs(ds.attrs)
    for variable in out.variables.values():
        variable.encoding = {}
    return out


def save(ds: xr.Dataset, path: str | Path) -> Path:
    """Write a result to one netCDF file or, for a path ending in ``.zarr``, a Zarr store, atomically.

    The result is written beside ``path`` and put in its place only when
    complete, so an interrupted save leaves the previous result intact. A
    Zarr store can then grow step by step (``peel(..., out="x.zarr")`` or
    `peelnb.PeelMonitor`).

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result.
    path : str or Path
        Target ``.nc`` file or ``.zarr`` store.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ImportError
        For a ``.zarr`` path when the zarr package is not installed.

    Examples
    --------
    >>> import peelnb, tempfile, os
    >>> ds = peelnb.tutorial.example_result()
    >>> path = peelnb.save(ds, os.path.join(tempfile.mkdtemp(), "peel.nc"))
    >>> peelnb.open(path).identical(ds)
    True
    >>> store = peelnb.save(ds, os.path.join(tempfile.mkdtemp(), "peel.zarr"))
    >>> peelnb.open(store).identical(ds)
    True
    """
    validate(ds)
    path = Path(path)
    out = _for_storage(ds)
    if path.suffix == ZARR_SUFFIX:
        zarr = require_zarr()
        with atomic_dir(path) as tmp:
            _write_store(zarr, out, tmp)
        return path
    with atomic_path(path) as tmp:
        out.to_netcdf(tmp, engine="h5netcdf")
    return path


def _write_store(zarr: ModuleType, ds: xr.Dataset, folder: Path) -> None:
    """Write ``ds`` as a new Zarr store: format 2, one chunk per step, consolidated metadata."""
    encoding = {
        name: {"chunks": tuple(1 if dim == "step" else max(1, size) for dim, size in variable.sizes.items())}
        for name, variable in ds.variables.items()
    }
    version = {"zarr_format": 2} if _zarr_v3(zarr) else {}
    ds.to_zarr(folder, mode="w", consolidated=True, encoding=encoding, write_empty_chunks=True, **version)


def open(path: str | Path) -> xr.Dataset:  # noqa: A001 - public name, like xarray's open_dataset
    """Open a saved result fully into memory: a netCDF file or a Zarr store (which may still be growing).

    A Zarr store is read as of its last committed append: steps another
    process is appending meanwhile appear at the next `open`.

    Parameters
    ----------
    path : str or Path
        A file or store written by `save` (or by ``peel(..., out=path)`` or
        `peelnb.PeelMonitor`): a ``.nc`` file, or a Zarr store (a folder
        named ``*.zarr`` or holding Zarr metadata).

    Returns
    -------
    xarray.Dataset
        The result, validated against the schema.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a peelnb result.
    ImportError
        For a Zarr store when the zarr package is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"result file {str(path)!r} does not exist")
    if path.is_dir():
        if not is_zarr(path):
            raise ValueError(_folder_not_result(path))
        with _open_store(path) as handle:
            ds = handle.load()
        return validate(ds)
    try:
        with xr.open_dataset(path, engine="h5netcdf") as handle:
            ds = handle.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a netCDF file peelnb can read ({err})") from None
    return validate(ds)


def _folder_not_result(path: Path) -> str:
    """Why a folder that is not a Zarr store cannot be opened, naming the result files it holds."""
    inside = sorted(str(p) for p in path.rglob("*.nc"))
    if inside:
        shown = ", ".join(repr(p) for p in inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else "")
        return f"{str(path)!r} is a folder, not a result; the result files in it: {shown}"
    return (f"{str(path)!r} is a folder, not a result: open a .nc file written by peelnb (a run's result is "
            f"its peel.nc) or a Zarr store (a folder whose name ends in {ZARR_SUFFIX})")


@contextlib.contextmanager
def _open_store(path: Path) -> Iterator[xr.Dataset]:
    """The committed state of a Zarr store, lazily (its consolidated metadata gives every array's shape)."""
    require_zarr()
    try:
        handle = xr.open_dataset(path, engine="zarr", consolidated=True, chunks=None)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{str(path)!r} is not a Zarr store peelnb can read ({type(err).__name__}: {err}); peelnb reads "
            "stores with consolidated metadata (zarr.consolidate_metadata(path) adds it)"
        ) from None
    with handle:
        yield handle


def append_step(ds: xr.Dataset, store: str | Path) -> list[int]:
    """Append the steps of ``ds`` to a Zarr store along ``step``; create the store if it does not exist.

    One call commits all its steps at once, with the last write (see the
    module notes): a crash mid-append loses at most the steps of that call
    and never the steps already committed, and the next append completes
    cleanly. Steps already in the store are skipped, so re-running a
    monitored training run resumes without duplicates; steps stay sorted.

    Parameters
    ----------
    ds : xarray.Dataset
        A peel result holding the new steps, with the store's layers,
        permutations, bits, variables and settings.
    store : str or Path
        A ``.zarr`` store.

    Returns
    -------
    list of int
        The steps written (those not already in the store), sorted.

    Raises
    ------
    ValueError
        If ``ds`` repeats a step, ``store`` is not a Zarr store, or the store
        holds a peel with other settings (naming each difference).
    ImportError
        When the zarr package is not installed.

    Examples
    --------
    >>> import peelnb, tempfile, os
    >>> from peelnb.results import append_step
    >>> ds = peelnb.tutorial.example_result()
    >>> store = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> append_step(ds.isel(step=[0, 1]), store)
    [0, 75]
    >>> append_step(ds.isel(step=[1, 2]), store)
    [150]
    >>> peelnb.open(store)["step"].values.tolist()
    [0, 75, 150]
    """
    zarr = require_zarr()
    path = Path(store)
    validate(ds)
    if not is_zarr(path):
        raise ValueError(
            f"{str(path)!r} is not a Zarr store: steps are appended to a store whose name ends in .zarr "
            "(a netCDF file is rewritten whole with save)"
        )
    steps = ds["step"].values
    if len(np.unique(steps)) != len(steps):
        raise ValueError(f"the steps to append repeat: {steps.tolist()}")
    new = _for_storage(ds.sortby("step"))
    if not path.exists():
        save(new, path)
        return [int(s) for s in new["step"].values]
    with _open_store(path) as committed:
        problems = _differences(committed, new)
        if problems:
            raise ValueError(
                f"cannot append to {str(path)!r}: it holds a peel with other settings ({'; '.join(problems)}); "
                "append steps peeled with the store's settings, or write to another store"
            )
        new = new.isel(step=np.flatnonzero(~np.isin(new["step"].values, committed["step"].values)))
        written = [int(s) for s in new["step"].values]
        start = committed.sizes["step"]
        if not written:
            return []
        if not start or written[0] > int(committed["step"].values.max()):
            names = [name for name, variable in committed.variables.items() if "step" in variable.dims]
            _write_steps(zarr, path, new, start, names)
            return written
        log.info("steps %s sort before the last step of %s: rewriting the store", written, path)
        merged = xr.concat([committed.load(), new], dim="step", data_vars="minimal", coords="minimal",
                           compat="override", join="exact", combine_attrs="override")
    save(merged.sortby("step"), path)
    return written


def _differences(committed: xr.Dataset, new: xr.Dataset) -> list[str]:
    """What differs between a store's committed result and new steps, besides the steps themselves."""
    problems = []
    ours, theirs = set(committed.variables), set(new.variables)
    if ours - theirs:
        problems.append(f"the new steps lack {sorted(ours - theirs)}")
    if theirs - ours:
        problems.append(f"the store lacks {sorted(theirs - ours)}")
    for name in sorted(ours & theirs):
        old, fresh = committed[name].variable, new[name].variable
        if old.dims != fresh.dims:
            problems.append(f"{name} has dims {fresh.dims}, the store {old.dims}")
        elif not _fits(fresh.dtype, old.dtype):
            problems.append(f"{name} is {fresh.dtype}, the store holds {old.dtype}")
        elif "step" not in old.dims and not np.array_equal(old.values, fresh.values):
            problems.append(f"{name} is {fresh.values.tolist()}, the store's {old.values.tolist()}")
        if old.attrs != fresh.attrs:
            problems.append(f"{name} has attributes {fresh.attrs}, the store's {old.attrs}")
    for key in sorted((set(committed.attrs) | set(new.attrs)) - set(VOLATILE_ATTRS)):
        if committed.attrs.get(key) != new.attrs.get(key):
            problems.append(f"{key} is {new.attrs.get(key)!r}, the store's {committed.attrs.get(key)!r}")
    return problems


def _fits(new: np.dtype, stored: np.dtype) -> bool:
    """Whether values of dtype ``new`` are stored exactly in an array of dtype ``stored``."""
    return new == stored or (new.kind == stored.kind == "U" and new.itemsize <= stored.itemsize)


def _write_steps(zarr: ModuleType, path: Path, new: xr.Dataset, start: int, names: list[str]) -> None:
    """Write ``new`` at step positions ``start...`` of every step array, then commit (consolidate metadata)."""
    group = _writable_group(zarr, path)
    with _write_config(zarr):
        for name in names:
            variable = new[name].variable
            _write_region(group[name], variable.dims.index("step"), start, variable.values)
    zarr.consolidate_metadata(str(path))


def _write_region(array: Any, axis: int, start: int, values: np.ndarray) -> None:
    """Resize ``array`` along ``axis`` to end where ``values`` written at ``start`` end, and write them."""
    stop = start + values.shape[axis]
    shape = list(array.shape)
    shape[axis] = stop
    array.resize(tuple(shape))
    region = tuple(slice(start, stop) if i == axis else slice(None) for i in range(array.ndim))
    array[region] = values.astype(array.dtype)


def _writable_group(zarr: ModuleType, path: Path) -> Any:
    """The store's root group opened for writing, with every array's own (not the consolidated) metadata."""
    if _zarr_v3(zarr):
        return zarr.open_group(str(path), mode="r+", use_consolidated=False)
    return zarr.open_group(str(path), mode="r+")


def _write_config(zarr: ModuleType) -> contextlib.AbstractContextManager[Any]:
    """Write every chunk, even one equal to the fill value, so that any zarr version reads it back."""
    if _zarr_v3(zarr):
        return zarr.config.set({"array.write_empty_chunks": True})
    return contextlib.nullcontext()


def save_step(ds: xr.Dataset, path: str | Path, step: int) -> None:
    """Keep ``ds`` on disk once ``step`` is computed: a Zarr store gets that step appended, a netCDF file is rewritten.

    Parameters
    ----------
    ds : xarray.Dataset
        The result being filled (every step; ``step`` is complete).
    path : str or Path
        A ``.zarr`` store or a netCDF file.
    step : int
        The step just computed.
    """
    if is_zarr(path):
        append_step(ds.sel(step=[step]), path)
    else:
        save(ds, path)


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


def _check_tolerance(floor: float, noise_multiple: float) -> None:
    """A clear error for a flag tolerance setting that is not a non-negative number."""
    for name, value in (("floor", floor), ("noise_multiple", noise_multiple)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r}: pass a non-negative number (defaults: floor={FLAG_FLOOR}, "
                             f"noise_multiple={NOISE_MULTIPLE})")


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
        ds = validate(self._ds)
        best = ds["loss_model"] - ds["loss_ref"].min("permutation", skipna=True)
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
        _check_tolerance(floor, noise_multiple)
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

        Raises
        ------
        ValueError
            If the Dataset is not a peel result, or a setting is not a non-negative number.
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
        by: str = "gap",
    ) -> pd.DataFrame:
        """Table of layers ranked from most to least under-optimized.

        By default (``by="gap"``), within each (step, bits), flagged layers
        come first, then layers are ordered by their best gap on their own
        scale (the ``score``: the first block's gap divided by its ablation
        cost relative to the other blocks' median, everyone else's gap as
        is); rank 1 is the most under-optimized. Layers with no result come
        last. ``by`` ranks by one of the usual signals instead, in the
        direction `RANKINGS` gives: ``"ablation"`` (smallest loss increase
        first), ``"alpha"`` (largest first), ``"grad_norm"`` (smallest first)
        or ``"weight_change"`` (smallest first); the last three need a peel
        with ``baselines=True``.

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
        by : {"gap", "ablation", "alpha", "grad_norm", "weight_change"}
            What ranks the layers.

        Returns
        -------
        pandas.DataFrame
            Columns step, bits, rank, layer, gap, score, noise, tolerance,
            flagged, loss_model, loss_ref, loss_model_q, local_err; then the
            baselines the result holds (grad_norm, weight_change, alpha) and,
            with ``by="ablation"``, ``ablation`` (loss_ablate - loss_model).

        Raises
        ------
        ValueError
            For a step or bits value not in the result, a ``by`` it cannot rank by,
            or an ``n`` that is not a positive integer.

        Examples
        --------
        >>> import peelnb
        >>> ds = peelnb.tutorial.example_result()
        >>> ds.peel.summary(bits=32, by="ablation")[["rank", "layer"]].values.tolist()
        [[1, 1], [2, 2], [3, 0]]
        """
        ds = validate(self._ds)
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"n={n!r}: pass a positive number of layers to keep per bit-width, or None for all")
        if by not in RANKINGS:
            raise ValueError(f"by={by!r} is not something summary ranks by; pass one of {list(RANKINGS)}")
        if by in OPTIONAL_VARIABLES and by not in ds:
            raise ValueError(f"the result holds no {by!r}: peel with baselines=True to rank by it")
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
        extra = [name for name in OPTIONAL_VARIABLES if name in ds]
        for name in extra:
            table[name] = ds[name].sel(step=step)
        if by == "ablation":
            extra.append("ablation")
            table["ablation"] = ds["loss_ablate"].sel(step=step) - ds["loss_model"].sel(step=step)
        frame = table.drop_vars([c for c in table.coords if c not in ("layer", "bits")]).to_dataframe().reset_index()
        frame.insert(0, "step", step)
        if "bits" not in frame:
            frame.insert(1, "bits", bits)
        if by == "gap":
            keys, ascending, ranked = ["flagged", "score"], [False, False], frame["score"].notna()
        else:
            keys, ascending = [by], [RANKINGS[by][0] == "smaller"]
            ranked = frame[by].notna() & frame["score"].notna()
        frame = frame.sort_values(["bits", *keys], ascending=[False, *ascending], na_position="last", kind="stable")
        frame["rank"] = (frame.groupby("bits").cumcount() + 1).where(ranked.loc[frame.index])
        if n is not None:
            frame = frame.groupby("bits", sort=False).head(n)
        columns = ["step", "bits", "rank", "layer", "gap", "score", "noise", "tolerance", "flagged",
                   "loss_model", "loss_ref", "loss_model_q", "local_err", *extra]
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


def _bits_kind(bits: float) -> str:
    """' (full)' for 32 bits, ' (ternary)' for 1.58, '' otherwise."""
    if math.isclose(bits, 32):
        return " (full)"
    return " (ternary)" if math.isclose(bits, 1.58) else ""


def fmt_bits(bits: float) -> str:
    """Human label of a bit-width: '32 (full)', '1.58 (ternary)', '4'."""
    return f"{bits:g}{_bits_kind(bits)}"


def bits_phrase(bits: float) -> str:
    """A bit-width in a sentence: '1 bit', '4 bits', '1.58 bits (ternary)', '32 bits (full)'."""
    return f"{bits:g} {'bit' if math.isclose(bits, 1) else 'bits'}{_bits_kind(bits)}"
