"""Public helpers for testing code that produces or consumes peel results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

from .results import new_dataset, validate

TIMING_VARIABLES = ("solve_seconds",)
TIMING_ATTRS = ("created",)


def assert_same_result(
    actual: xr.Dataset,
    expected: xr.Dataset,
    *,
    ignore_attrs: Iterable[str] = TIMING_ATTRS,
) -> None:
    """Assert two peel results are identical except for wall-clock records.

    Values, coordinates, dtypes and attributes must match exactly; the
    ``solve_seconds`` timings must be computed (or missing) in the same cells,
    and the ``created`` timestamp is ignored.

    Raises
    ------
    AssertionError
        Naming what differs.

    Examples
    --------
    >>> import peelnb
    >>> ds = peelnb.tutorial.example_result()
    >>> assert_same_result(ds, ds.copy(deep=True))
    """
    validate(actual)
    validate(expected)
    for name in TIMING_VARIABLES:
        same_cells = np.array_equal(actual[name].isnull().values, expected[name].isnull().values)
        assert same_cells, f"{name} is computed in different cells"
    ignored = set(ignore_attrs)
    left = actual.drop_vars(TIMING_VARIABLES)
    right = expected.drop_vars(TIMING_VARIABLES)
    left.attrs = {k: v for k, v in actual.attrs.items() if k not in ignored}
    right.attrs = {k: v for k, v in expected.attrs.items() if k not in ignored}
    xr.testing.assert_identical(left, right)


def _axis(value: int | Sequence[int], name: str, *, spacing: int = 1) -> np.ndarray:
    """Coordinate values from a count (``0, spacing, 2 * spacing, ...``) or an explicit sequence."""
    values = np.arange(int(value)) * spacing if np.ndim(value) == 0 else np.asarray(value, dtype=np.int64)
    if values.size == 0:
        raise ValueError(f"{name} must hold at least one value; pass a positive count or a non-empty list")
    if np.unique(values).size != values.size:
        raise ValueError(f"{name} has repeated values {values.tolist()}; pass distinct values")
    return np.sort(values)


def synthetic_result(
    *,
    steps: int | Sequence[int] = 6,
    layers: int | Sequence[int] = 4,
    permutations: int | Sequence[int] = 3,
    bits: Sequence[float] = (1.0, 1.58, 4.0, 32.0),
    planted: int | None = None,
    seed: int = 0,
    nan_fraction: float = 0.0,
) -> xr.Dataset:
    """A schema-valid peel result made of synthetic numbers (no torch, no training), for tests and demos.

    The numbers behave like a replace-view peel of a model with one layer
    frozen during training: ``loss_model`` falls over the steps; every layer's
    best gap starts just below 0 and becomes clearly negative as training
    proceeds (the first block most), more so at low bit-widths. The planted
    layer's best gap stays within 0.001 of 0 at every step and bit-width
    (every other layer's is below -0.004), so it holds the largest gap of
    every (step, bits) and is flagged everywhere. The spread over permutations
    is below 0.002 nats, under the default flag floor. The round-to-nearest
    baseline ``loss_model_q`` equals ``loss_model`` at 32 bits and grows worse
    with fewer bits, faster than the references do.

    Parameters
    ----------
    steps, layers, permutations : int or sequence of int
        Coordinate values, or a count: ``steps=5`` gives steps 0, 100, ..., 400;
        ``layers=4`` gives layers 0..3; ``permutations=3`` gives 0..2.
    bits : sequence of float
        Bit-widths (32 = full precision, 1.58 = ternary).
    planted : int, optional
        The under-optimized layer (recorded as ``attrs["fault"] = "frozen:<layer>"``);
        default the middle layer, ``layers[len(layers) // 2]``.
    seed : int
        Seed of every random choice: the same arguments give an identical Dataset.
    nan_fraction : float
        Fraction of (step, layer, permutation, bits) cells left missing (NaN) in
        ``loss_ref``, ``loss_ref_calib``, ``local_err`` and ``solve_seconds``, chosen at
        random; default 0 (no NaN anywhere).

    Returns
    -------
    xarray.Dataset
        A result following DESIGN.md §5, with ``attrs["source"]`` saying it is synthetic.

    Raises
    ------
    ValueError
        For an empty or repeated coordinate, a planted layer not among ``layers``,
        or ``nan_fraction`` outside [0, 1].

    Examples
    --------
    >>> ds = synthetic_result(steps=4, layers=3, permutations=2, bits=[4, 32], planted=1)
    >>> dict(ds["loss_ref"].sizes)
    {'step': 4, 'layer': 3, 'permutation': 2, 'bits': 2}
    >>> int(ds.peel.best().sel(bits=32).isel(step=-1).argmax("layer"))
    1
    >>> bool(ds.peel.flagged().sel(layer=1).all())
    True
    """
    step_values = _axis(steps, "steps", spacing=100)
    layer_values = _axis(layers, "layers")
    perm_values = _axis(permutations, "permutations")
    bit_values = np.asarray(sorted({float(b) for b in bits}), dtype=np.float64)
    if bit_values.size == 0:
        raise ValueError("bits must hold at least one bit-width, e.g. bits=[1.58, 4, 32]")
    planted = int(layer_values[len(layer_values) // 2]) if planted is None else int(planted)
    if planted not in layer_values:
        raise ValueError(f"planted={planted} is not one of the layers {layer_values.tolist()}; pick one of them")
    if not 0.0 <= nan_fraction <= 1.0:
        raise ValueError(f"nan_fraction={nan_fraction} is outside [0, 1]; pass a fraction of cells to leave missing")
    rng = np.random.default_rng(seed)
    n_step, n_layer, n_perm, n_bits = len(step_values), len(layer_values), len(perm_values), len(bit_values)

    span = max(int(step_values[-1] - step_values[0]), 1)
    progress = 1.0 - np.exp(-4.0 * (step_values - step_values[0]) / span)  # (step,) 0 -> ~1
    loss_model = 2.0 + 2.3 * (1.0 - progress)
    learned = rng.uniform(0.02, 0.08, n_layer)  # (layer,) how far each layer pulls ahead
    learned[0] = 0.25 if layer_values[0] == 0 else learned[0]  # the first block dominates
    is_planted = layer_values == planted
    learned[is_planted] = 0.0
    depth = progress[:, None] * learned[None, :]  # (step, layer)
    low_bits = np.where(bit_values >= 32, 0.0, 2.0 ** (1.0 - bit_values))  # (bits,) 0 at full precision

    gap = -(0.004 + depth[:, :, None] * (1.0 + low_bits))  # (step, layer, bits)
    gap[:, is_planted, :] = 0.001
    noise = rng.uniform(0.0, 0.002, (n_step, n_layer, n_perm, n_bits))
    loss_ref = loss_model[:, None, None, None] - gap[:, :, None, :] + noise
    local_err = np.clip(0.05 + 2.0 * depth[:, :, None, None] * (1.0 + low_bits) + 5.0 * noise, 0.0, 1.0)
    local_err = np.broadcast_to(local_err, loss_ref.shape).copy()
    loss_q = loss_model[:, None, None] + 3.0 * low_bits * (0.0005 + depth[:, :, None])
    ablate = loss_model[:, None] + 0.001 + 4.0 * depth

    ds = new_dataset(
        step_values.tolist(), layer_values.tolist(), perm_values.tolist(), bit_values.tolist(),
        layer_names=[f"blocks.{layer}" for layer in layer_values],
        attrs=dict(
            source="peelnb.testing.synthetic_result (synthetic numbers, not a peel)",
            fault=f"frozen:{planted}", view="replace", target="output", init="scratch", seed=seed,
        ),
    )
    missing = rng.random(loss_ref.shape) < nan_fraction
    ds["loss_model"][:] = loss_model
    ds["loss_model_q"][:] = loss_q
    ds["loss_ablate"][:] = ablate
    for name, values in [
        ("loss_ref", loss_ref),
        ("loss_ref_calib", loss_ref - rng.uniform(0.0, 0.002, loss_ref.shape)),
        ("local_err", local_err),
        ("solve_seconds", 0.01 + rng.uniform(0.0, 0.01, loss_ref.shape)),
    ]:
        ds[name][:] = np.where(missing, np.nan, values)
    return validate(ds)
