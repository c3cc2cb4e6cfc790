"""Result schema, derived quantities, atomic save/open and torch-free use (peelnb.results)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import peelnb
from peelnb import results
from peelnb.testing import assert_same_result

NAN = math.nan
STEPS, LAYERS, PERMS, BITS = [0, 100], [0, 1, 2, 3], [0, 1, 2], [1.58, 32.0]

# Hand-set numbers at step 100 (loss_model 2.0); step 0 has every reference equal to the model (4.0).
LOSS_REF_100 = {
    # bits 1.58: (best gap, spread) by layer = (+0.10, 0.01), (+0.06, 0.01), (-0.05, 0.02), (-0.02, 0.002)
    1.58: [[1.90, 1.91, 1.905], [1.94, 1.95, 1.945], [2.05, 2.06, 2.07], [2.02, 2.021, 2.022]],
    # bits 32: (-0.30, 0.02), (-0.005, 0.035), (+0.05, 0.01; one permutation missing), (all missing)
    32.0: [[2.30, 2.32, 2.31], [2.005, 2.04, 2.02], [1.95, 1.96, NAN], [NAN, NAN, NAN]],
}
ABLATE_100 = [5.0, 2.2, 2.3, 2.1]  # ablation costs 3.0, 0.2, 0.3, 0.1: the first block's scale is 3.0 / 0.2 = 15

# What the rules of DESIGN.md §5 give for those numbers, worked out by hand (step 100).
BEST_100 = {1.58: [0.10, 0.06, -0.05, -0.02], 32.0: [-0.30, -0.005, 0.05, NAN]}
NOISE_100 = {1.58: [0.01, 0.01, 0.02, 0.002], 32.0: [0.02, 0.035, 0.01, NAN]}
# tolerance = max(0.01, 1 * noise); the headroom view scales the first block's 0.01 floor by 15
TOL_REPLACE_100 = {1.58: [0.01, 0.01, 0.02, 0.01], 32.0: [0.02, 0.035, 0.01, 0.01]}
TOL_HEADROOM_100 = {1.58: [0.15, 0.01, 0.02, 0.01], 32.0: [0.15, 0.035, 0.01, 0.01]}
# replace: best > -tol; headroom: best > +tol; NaN never
FLAG_REPLACE_100 = {1.58: [True, True, False, False], 32.0: [False, True, True, False]}
FLAG_HEADROOM_100 = {1.58: [False, True, False, False], 32.0: [False, False, True, False]}
# rank by best gap, the first block's divided by 15: 1.58 -> 0.0067, 0.06, -0.05, -0.02; 32 -> -0.02, -0.005, 0.05
ORDER_100 = {32.0: [2, 1, 0, 3], 1.58: [1, 0, 3, 2]}


def make_result(init: str = "scratch") -> xr.Dataset:
    target = "task" if init == "trained" else "output"
    ds = results.new_dataset(STEPS, LAYERS, PERMS, BITS, attrs={"target": target, "init": init, "seed": 0,
                                                                "solver_steps": 50, "lr": 3e-3},
                             layer_names=[f"blocks.{i}" for i in LAYERS])
    ds["loss_model"][:] = [4.0, 2.0]
    ds["loss_ref"].loc[dict(step=0)] = 4.0
    ds["loss_ablate"].loc[dict(step=0)] = 4.0  # no ablation cost: the first block's scale falls back to 1
    ds["loss_ablate"].loc[dict(step=100)] = ABLATE_100
    for bits, refs in LOSS_REF_100.items():
        ds["loss_ref"].loc[dict(step=100, bits=bits)] = refs
    ds["loss_ref_calib"][:] = ds["loss_ref"] - 0.01
    ds["local_err"][:] = xr.where(ds["loss_ref"].notnull(), 0.5, NAN)
    ds["solve_seconds"][:] = xr.where(ds["loss_ref"].notnull(), 0.25, NAN)
    ds["loss_model_q"][:] = 2.5
    return ds


def _at_100(da: xr.DataArray, bits: float) -> np.ndarray:
    return da.sel(step=100, bits=bits).transpose("layer").values


@pytest.fixture
def replace() -> xr.Dataset:
    return make_result("scratch")


@pytest.fixture
def headroom() -> xr.Dataset:
    return make_result("trained")


# ---------------------------------------------------------------- schema


def test_new_dataset_has_the_schema_dims_dtypes_units_and_nan(replace):
    empty = results.new_dataset([0, 5], [0, 1], [0], [32], attrs={"seed": 1})
    results.validate(empty)
    assert dict(empty.sizes) == {"step": 2, "layer": 2, "permutation": 1, "bits": 1}
    assert {name: empty[name].dtype for name in results.DIMS} == {
        "step": np.int64, "layer": np.int64, "permutation": np.int64, "bits": np.float64}
    for name, (dims, _, units) in results.VARIABLES.items():
        assert empty[name].dims == dims
        assert empty[name].attrs["units"] == units and empty[name].attrs["long_name"]
        assert empty[name].isnull().all(), name
    assert empty.attrs["schema_version"] == 1 and empty.attrs["seed"] == 1
    assert list(replace["layer_name"].values) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


def test_validate_names_what_is_missing(replace):
    broken = replace.drop_vars("loss_ablate")
    broken["local_err"] = broken["local_err"].transpose("bits", "step", "layer", "permutation")
    with pytest.raises(ValueError) as info:
        results.validate(broken)
    message = str(info.value)
    assert message.startswith("not a peelnb result: ")
    assert "variable 'loss_ablate' is missing" in message
    assert ("variable 'local_err' has dims ('bits', 'step', 'layer', 'permutation'), "
            "expected ('step', 'layer', 'permutation', 'bits')") in message
    with pytest.raises(ValueError, match="schema_version is 2, this peelnb reads 1"):
        results.validate(replace.assign_attrs(schema_version=2))


# ---------------------------------------------------------------- derived quantities


def test_gap_is_model_loss_minus_reference_loss(replace):
    gap = replace.peel.gap()
    assert gap.dims == ("step", "layer", "permutation", "bits")
    assert gap.attrs["units"] == "nats/token"
    assert float(gap.sel(step=100, layer=1, permutation=1, bits=32.0)) == pytest.approx(2.0 - 2.04)
    assert float(gap.sel(step=100, layer=0, permutation=2, bits=1.58)) == pytest.approx(2.0 - 1.905)
    assert np.isnan(gap.sel(step=100, layer=3, bits=32.0)).all()
    assert (gap.sel(step=0) == 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_best_noise_and_tolerance_match_hand_computation(replace, headroom, bits):
    np.testing.assert_allclose(_at_100(replace.peel.best(), bits), BEST_100[bits], atol=1e-12)
    np.testing.assert_allclose(_at_100(replace.peel.noise(), bits), NOISE_100[bits], atol=1e-12)
    np.testing.assert_allclose(_at_100(replace.peel.tolerance(), bits), TOL_REPLACE_100[bits], atol=1e-12)
    np.testing.assert_allclose(_at_100(headroom.peel.tolerance(), bits), TOL_HEADROOM_100[bits], atol=1e-12)


@pytest.mark.parametrize("bits", BITS)
def test_replace_view_flags_a_best_gap_above_minus_the_tolerance(replace, bits):
    assert _at_100(replace.peel.flagged(), bits).tolist() == FLAG_REPLACE_100[bits]


@pytest.mark.parametrize("bits", BITS)
def test_headroom_view_flags_a_best_gap_above_plus_the_tolerance(headroom, bits):
    assert _at_100(headroom.peel.flagged(), bits).tolist() == FLAG_HEADROOM_100[bits]


def test_headroom_first_block_floor_is_scaled_by_its_relative_ablation_cost(headroom):
    # gap +0.10 at 1.58 bits clears the plain 0.01 tolerance but not the first block's 15 x 0.01
    assert not bool(headroom.peel.flagged().sel(step=100, layer=0, bits=1.58))
    assert bool(headroom.peel.flagged(floor=0.005).sel(step=100, layer=0, bits=1.58))  # 15 x 0.005 = 0.075
    # the same rule with the ablation costs evened out: no scaling, flagged
    even = headroom.copy(deep=True)
    even["loss_ablate"].loc[dict(step=100, layer=0)] = 2.2
    assert float(even.peel.tolerance().sel(step=100, layer=0, bits=1.58)) == pytest.approx(0.01)
    assert bool(even.peel.flagged().sel(step=100, layer=0, bits=1.58))


def test_tolerance_is_at_least_the_floor_or_a_multiple_of_the_noise(replace):
    tol = replace.peel.tolerance(floor=0.03, noise_multiple=3.0)
    expected = [max(0.03, 3 * n) for n in NOISE_100[1.58]]
    np.testing.assert_allclose(_at_100(tol, 1.58), expected, atol=1e-12)
    # step 0: no spread and no ablation cost, the floor everywhere (first block too, in both views)
    assert np.allclose(replace.peel.tolerance().sel(step=0), 0.01)
    assert np.allclose(make_result("trained").peel.tolerance().sel(step=0), 0.01)


def test_nan_cells_are_never_flagged(replace, headroom):
    for ds in (replace, headroom):
        for floor in (0.01, 100.0):
            flags = ds.peel.flagged(floor=floor)
            assert not bool(flags.sel(step=100, layer=3, bits=32.0))
    wiped = replace.copy(deep=True)
    wiped["loss_ref"][:] = NAN
    assert not wiped.peel.flagged(floor=100.0).any()
    assert wiped.peel.flagged(floor=100.0).dtype == bool


def test_step_zero_matches_everywhere_so_replace_flags_all_and_headroom_none(replace, headroom):
    assert replace.peel.flagged().sel(step=0).all()
    assert not headroom.peel.flagged().sel(step=0).any()


# ---------------------------------------------------------------- summary


def test_summary_ranks_layers_within_each_bit_width(replace):
    table = replace.peel.summary()
    assert list(table.columns) == ["step", "bits", "rank", "layer", "gap", "score", "noise", "tolerance", "flagged",
                                   "loss_model", "loss_ref", "loss_model_q", "local_err"]
    assert (table["step"] == 100).all()  # the last step with results
    assert table["bits"].tolist() == [32.0] * 4 + [1.58] * 4
    for bits, order in ORDER_100.items():
        part = table[table["bits"] == bits]
        assert part["layer"].tolist() == order
        ranked = part["rank"].dropna().tolist()
        assert ranked == list(range(1, len(ranked) + 1))
        assert len(ranked) == (3 if bits == 32.0 else 4)
    assert table[(table["bits"] == 32.0) & (table["layer"] == 3)]["rank"].isna().all()  # NaN ranks last, no rank


def test_summary_ranks_the_first_block_by_its_gap_over_its_scale(replace):
    table = replace.peel.summary(bits=1.58)
    first = table[table["layer"] == 0].iloc[0]
    assert first["gap"] == pytest.approx(0.10)
    assert first["score"] == pytest.approx(0.10 / 15)
    assert first["rank"] == 2  # its raw gap (0.10) is the largest, but on its scale it is behind layer 1 (0.06)
    other = table[table["layer"] == 1].iloc[0]
    assert other["score"] == pytest.approx(other["gap"]) == pytest.approx(0.06)


def test_summary_columns_hold_the_hand_computed_numbers(replace, headroom):
    for ds, flags, tol in ((replace, FLAG_REPLACE_100, TOL_REPLACE_100), (headroom, FLAG_HEADROOM_100,
                                                                          TOL_HEADROOM_100)):
        table = ds.peel.summary().set_index(["bits", "layer"]).sort_index()
        for bits in BITS:
            rows = table.loc[bits]
            np.testing.assert_allclose(rows["gap"], BEST_100[bits], atol=1e-12)
            np.testing.assert_allclose(rows["noise"], NOISE_100[bits], atol=1e-12)
            np.testing.assert_allclose(rows["tolerance"], tol[bits], atol=1e-12)
            assert rows["flagged"].tolist() == flags[bits]
            assert (rows["loss_model"] == 2.0).all()
            np.testing.assert_allclose(rows["loss_ref"], [2.0 - b for b in BEST_100[bits]], atol=1e-12)
            assert rows["flagged"].dtype == bool


def test_summary_selects_step_bits_and_top_n(replace):
    at_zero = replace.peel.summary(step=0, bits=32)
    assert len(at_zero) == 4 and (at_zero["step"] == 0).all() and (at_zero["bits"] == 32.0).all()
    assert (at_zero["gap"] == 0).all() and at_zero["flagged"].all()
    top = replace.peel.summary(n=2)
    assert list(zip(top["bits"], top["layer"])) == [(32.0, 2), (32.0, 1), (1.58, 1), (1.58, 0)]
    assert replace.peel.summary(bits=1.580000001)["bits"].unique().tolist() == [1.58]


def test_summary_errors_name_the_available_choices(replace):
    with pytest.raises(ValueError, match=r"step 50 is not in the result; steps: \[0, 100\]"):
        replace.peel.summary(step=50)
    with pytest.raises(ValueError, match=r"bits=4 is not in the result; bits: \[1\.58, 32\.0\]"):
        replace.peel.summary(bits=4)
    empty = results.new_dataset([0], [0], [0], [32], attrs={})
    with pytest.raises(ValueError, match="holds no computed step yet"):
        empty.peel.summary()


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_summary_refuses_a_top_n_that_is_not_a_positive_integer(replace, n):
    with pytest.raises(ValueError, match=rf"n={n!r}: pass a positive number of layers"):
        replace.peel.summary(n=n)


@pytest.mark.parametrize(("setting", "value"), [("floor", -0.01), ("noise_multiple", "x"), ("floor", float("nan"))])
def test_flag_settings_must_be_non_negative_numbers(replace, setting, value):
    with pytest.raises(ValueError, match=rf"{setting}={value!r}: pass a non-negative number"):
        replace.peel.flagged(**{setting: value})


def test_accessor_on_a_dataset_missing_a_variable_says_it_is_not_a_result(replace):
    for derive in ("best", "flagged", "gap", "noise"):
        with pytest.raises(ValueError, match="not a peelnb result: variable 'loss_ref' is missing"):
            getattr(replace.drop_vars("loss_ref").peel, derive)()


def test_summary_of_the_tutorial_example_ranks_the_frozen_layer_first():
    ds = peelnb.tutorial.example_result()
    table = ds.peel.summary(bits=32)
    assert int(table["layer"].iloc[0]) == 1
    assert isinstance(table, pd.DataFrame)


# ---------------------------------------------------------------- save / open


def _assert_exact(actual: xr.Dataset, expected: xr.Dataset) -> None:
    xr.testing.assert_identical(actual, expected)
    for name in list(expected.variables):
        assert actual[name].dtype == expected[name].dtype, name


def test_save_open_round_trip_is_exact(tmp_path, replace):
    path = results.save(replace, tmp_path / "peel.nc")
    assert path == tmp_path / "peel.nc"
    _assert_exact(results.open(path), replace)
    _assert_exact(peelnb.open(str(path)), replace)


def test_tutorial_example_round_trips_exactly(tmp_path):
    ds = peelnb.tutorial.example_result()
    _assert_exact(peelnb.open(peelnb.save(ds, tmp_path / "example.nc")), ds)


def test_save_stores_numpy_scalars_and_bools_as_plain_numbers(tmp_path, replace):
    replace.attrs.update(n=np.int64(7), flag=True, frac=np.float32(0.5))
    back = results.open(results.save(replace, tmp_path / "peel.nc"))
    assert back.attrs["n"] == 7 and back.attrs["flag"] == 1 and back.attrs["frac"] == 0.5
    assert replace.attrs["flag"] is True  # the caller's dataset is not changed


def test_interrupted_save_keeps_the_previous_file_and_leaves_no_temporary_files(tmp_path, monkeypatch, replace):
    path = tmp_path / "peel.nc"
    results.save(replace, path)
    before = path.read_bytes()

    def crash(self, target, *args, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"\x89HDF\r\n\x1a\n half a file")
        raise RuntimeError("disk full")

    changed = replace.copy(deep=True)
    changed["loss_model"][:] = [9.0, 9.0]
    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        results.save(changed, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peel.nc"]
    with pytest.raises(RuntimeError, match="disk full"):
        results.save(changed, tmp_path / "new.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peel.nc"]
    monkeypatch.undo()
    _assert_exact(results.open(path), replace)


def test_open_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.open(tmp_path / "absent.nc")


def test_open_a_run_folder_names_the_result_files_inside(tmp_path, replace):
    results.save(replace, tmp_path / "clean" / "peel.nc")
    (tmp_path / "clean" / "run.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a folder, not a result; the result files in it: '.*clean/peel\.nc'"):
        results.open(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a folder, not a result: open a \.nc file"):
        results.open(tmp_path / "empty")


def test_open_a_file_that_is_not_netcdf(tmp_path):
    path = tmp_path / "notes.nc"
    path.write_text("step,layer,gap\n0,0,0.1\n")
    with pytest.raises(ValueError, match="is not a netCDF file peelnb can read"):
        results.open(path)


def test_open_a_netcdf_file_without_the_schema_variables(tmp_path):
    path = tmp_path / "other.nc"
    xr.Dataset({"temperature": ("time", [1.0, 2.0])}).to_netcdf(path, engine="h5netcdf")
    with pytest.raises(ValueError, match="not a peelnb result: dimension 'step' is missing.*"
                                         "variable 'loss_model' is missing"):
        results.open(path)


def test_save_rejects_a_dict_attribute_and_writes_nothing(tmp_path, replace):
    replace.attrs["solver"] = {"steps": 50}
    with pytest.raises(TypeError, match="attribute 'solver' is a dict; store str, int or float"):
        results.save(replace, tmp_path / "peel.nc")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_a_dataset_outside_the_schema(tmp_path, replace):
    with pytest.raises(ValueError, match="variable 'loss_ref' is missing"):
        results.save(replace.drop_vars("loss_ref"), tmp_path / "peel.nc")
    assert list(tmp_path.iterdir()) == []


def test_settings_decodes_json_attributes(replace):
    replace.attrs["peel_config"] = '{"view": "replace", "bits": [1.58, 32.0]}'
    settings = replace.peel.settings()
    assert settings["peel_config"] == {"view": "replace", "bits": [1.58, 32.0]}
    assert settings["init"] == "scratch"


# ---------------------------------------------------------------- peelnb.testing


def test_assert_same_result_accepts_a_deep_copy(replace):
    assert_same_result(replace, copy.deepcopy(replace))
    assert_same_result(replace, replace.copy(deep=True))


def test_assert_same_result_ignores_timings_and_creation_time(replace):
    other = replace.copy(deep=True)
    other["solve_seconds"][:] = other["solve_seconds"] * 3
    other.attrs["created"] = "1999-01-01T00:00:00+00:00"
    assert_same_result(replace, other)


def test_assert_same_result_fails_when_one_value_differs(replace):
    other = replace.copy(deep=True)
    other["loss_ref"].loc[dict(step=100, layer=1, permutation=2, bits=32.0)] += 1e-9
    with pytest.raises(AssertionError):
        assert_same_result(replace, other)


def test_assert_same_result_fails_on_an_attribute_or_timing_pattern(replace):
    other = replace.copy(deep=True)
    other.attrs["seed"] = 1
    with pytest.raises(AssertionError):
        assert_same_result(replace, other)
    other = replace.copy(deep=True)
    other["solve_seconds"].loc[dict(step=0, layer=0, permutation=0, bits=32.0)] = NAN
    with pytest.raises(AssertionError, match="solve_seconds is computed in different cells"):
        assert_same_result(replace, other)


# ---------------------------------------------------------------- without torch


def test_results_open_summarize_and_save_without_importing_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import peelnb
        ds = peelnb.tutorial.example_result()
        table = ds.peel.summary()
        path = peelnb.save(ds, {str(tmp_path / "x.nc")!r})
        back = peelnb.open(path)
        assert back.identical(ds)
        print(len(table), "torch" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12", "False"]
