"""The bundled example result is what the current code computes."""

from __future__ import annotations

import xarray as xr

import peelnb
from peelnb.tutorial import build_example

MACHINE_DEPENDENT = ("created", "peelnb_version", "torch_version")


def test_bundled_example_matches_a_fresh_build(tmp_path):
    """Same code, same seed: the same numbers (to float rounding, which differs between CPUs)."""
    fresh = build_example(tmp_path).drop_vars("solve_seconds")
    bundled = peelnb.tutorial.example_result().drop_vars("solve_seconds")
    xr.testing.assert_allclose(fresh, bundled, rtol=1e-5, atol=1e-6)
    same = {k: v for k, v in fresh.attrs.items() if k not in MACHINE_DEPENDENT}
    assert same == {k: v for k, v in bundled.attrs.items() if k not in MACHINE_DEPENDENT}
