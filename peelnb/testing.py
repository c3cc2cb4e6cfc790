"""Public helpers for testing code that produces or consumes peel results."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xarray as xr

from .results import validate

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
