"""The explorer widget, driven from Python: each control changes what is plotted, flagged and tabled."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import peelnb
from peelnb.testing import synthetic_result
from peelnb.widgets import Explorer

BITS = [1.0, 1.58, 4.0, 32.0]
PLANTED = 3


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    """8 steps (0..700) x 6 layers x 3 permutations x 4 bits, layer 3 planted."""
    return synthetic_result(steps=8, layers=6, permutations=3, bits=BITS, planted=PLANTED, seed=2)


def _expected_flags(ds: xr.Dataset, bits: float, **tolerance: float) -> list[tuple[int, int]]:
    flags = ds.peel.flagged(**tolerance).sel(bits=bits).transpose("step", "layer")
    steps, layers = np.nonzero(flags.values)
    return [(int(ds["step"][i]), int(ds["layer"][j])) for i, j in zip(steps, layers)]


def _best(ds: xr.Dataset, bits: float) -> np.ndarray:
    return ds.peel.best().sel(bits=bits).transpose("layer", "step").values


def test_explore_builds_a_widget_that_displays_itself_with_every_control_and_three_images(ds):
    viewer = peelnb.explore(ds)
    assert isinstance(viewer, Explorer)
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert set(viewer.controls) == {"variable", "reduce", "bits", "step_range", "floor", "noise_multiple", "layer"}
    for image in (viewer.heatmap_image, viewer.curves_image, viewer.gaps_image):
        assert bytes(image.value).startswith(b"\x89PNG")
    assert "8 steps (0..700) x 6 layers x 3 permutations x 4 bit-widths" in viewer.status.value
    # defaults: 32 bits, best reference, all steps, the planted layer in the per-layer panel
    assert (viewer.bits, viewer.reduce, viewer.step_range, viewer.layer) == (32.0, "best", (0, 700), PLANTED)
    np.testing.assert_allclose(viewer.plotted.values, _best(ds, 32))
    assert viewer.flagged == _expected_flags(ds, 32)
    assert len(viewer.figure.axes) == 2  # heatmap and colorbar


def test_setting_bits_redraws_the_heatmap_the_layer_curves_and_the_flags(ds):
    viewer = peelnb.explore(ds)
    before = bytes(viewer.heatmap_image.value)
    curves_before = bytes(viewer.curves_image.value)
    viewer.bits = 1.58
    assert viewer.bits == 1.58 and float(viewer.plotted["bits"]) == 1.58
    np.testing.assert_allclose(viewer.plotted.values, _best(ds, 1.58))
    assert bytes(viewer.heatmap_image.value) != before and bytes(viewer.curves_image.value) != curves_before
    assert "1.58 bits (ternary)" in viewer.figure.axes[0].get_title()
    assert viewer.curves_figure.axes[0].get_title().endswith("references at 1.58 bits (ternary)")
    assert viewer.flagged == _expected_flags(ds, 1.58)
    assert viewer.controls["bits"].value == 1.58  # the dropdown follows the trait
    viewer.controls["bits"].value = 4.0  # and the trait follows the dropdown
    assert viewer.bits == 4.0
    np.testing.assert_allclose(viewer.plotted.values, _best(ds, 4))


def test_variable_and_reduce_choose_what_the_heatmap_shows(ds):
    viewer = peelnb.explore(ds, bits=4)
    colorbar = viewer.figure.axes[0].images[0].colorbar
    viewer.variable = "local_err"
    np.testing.assert_allclose(viewer.plotted.values, ds["local_err"].sel(bits=4).min("permutation").T.values)
    assert colorbar.ax.get_ylabel() == "best reference: relative error of the reference's output"
    viewer.reduce = 2
    np.testing.assert_allclose(viewer.plotted.values, ds["local_err"].sel(bits=4, permutation=2).T.values)
    viewer.variable = "gap"
    np.testing.assert_allclose(viewer.plotted.values,
                               (ds["loss_model"] - ds["loss_ref"].sel(bits=4, permutation=2)).T.values)
    viewer.reduce = "mean"
    np.testing.assert_allclose(viewer.plotted.values,
                               (ds["loss_model"] - ds["loss_ref"].sel(bits=4).mean("permutation")).T.values)
    viewer.variable = "loss_model_q"
    np.testing.assert_allclose(viewer.plotted.values, ds["loss_model_q"].sel(bits=4).T.values)
    assert colorbar.ax.get_ylabel().endswith("(nats/token)")
    assert viewer.controls["variable"].value == "loss_model_q" and viewer.controls["reduce"].value == "mean"


def test_step_range_restricts_the_heatmap_flags_table_and_layer_panel_and_snaps_to_steps(ds):
    viewer = peelnb.explore(ds)
    viewer.step_range = (150, 520)
    assert viewer.step_range == (200, 500)
    assert viewer.plotted["step"].values.tolist() == [200, 300, 400, 500]
    np.testing.assert_allclose(viewer.plotted.values, _best(ds, 32)[:, 2:6])
    assert viewer.flagged == [pair for pair in _expected_flags(ds, 32) if 200 <= pair[0] <= 500]
    assert viewer.table["flagged_steps"].max() == 4
    assert viewer.curves_figure.axes[0].lines[0].get_xdata().tolist() == [200, 300, 400, 500]
    assert viewer.controls["step_range"].value == (200, 500)
    viewer.step_range = (None, 100)
    assert viewer.step_range == (0, 100) and viewer.plotted.sizes["step"] == 2


def test_the_flag_threshold_controls_change_the_flagged_list_and_the_table(ds):
    viewer = peelnb.explore(ds)
    default = viewer.flagged
    assert {layer for _, layer in default} >= {PLANTED}
    viewer.floor = 1.0  # every gap here is above -1 nat: everything is flagged
    assert len(viewer.flagged) == 8 * 6
    assert sorted(viewer.table["layer"]) == list(range(6))
    assert len(viewer.figure.axes[0].collections[0].get_offsets()) == 8 * 6
    viewer.floor = 0.0
    viewer.noise_multiple = 0.0
    assert viewer.flagged == _expected_flags(ds, 32, floor=0.0, noise_multiple=0.0)
    assert viewer.flagged != default
    viewer.noise_multiple = 1.0
    viewer.floor = 0.01
    assert viewer.flagged == default


def test_the_table_lists_the_flagged_layers_the_planted_one_first(ds):
    viewer = peelnb.explore(ds)
    table = viewer.table
    assert table.iloc[0].to_dict() == dict(layer=PLANTED, flagged_steps=8, first_step=0, last_step=700,
                                           last_gap=pytest.approx(float(ds.peel.best().sel(bits=32, step=700,
                                                                                           layer=PLANTED))),
                                           planted=True)
    counts = {layer: sum(1 for _, hit in viewer.flagged if hit == layer) for layer in table["layer"]}
    assert table["flagged_steps"].tolist() == [counts[layer] for layer in table["layer"]]
    assert "<b>Flagged layers</b>" in viewer.table_html.value and "planted" in viewer.table_html.value
    viewer.step_range = (300, None)  # only the planted layer stays flagged after the first steps
    assert viewer.table["layer"].tolist() == [PLANTED]
    assert "1 of 6 at 32 bits (full), steps 300..700" in viewer.table_html.value


def test_the_layer_control_picks_the_layer_of_the_per_layer_panel(ds):
    viewer = peelnb.explore(ds, layer=0)
    curves, gaps = viewer.curves_figure.axes[0], viewer.gaps_figure.axes[0]
    assert curves.get_title().startswith("layer 0,")
    heatmap = bytes(viewer.heatmap_image.value)
    viewer.layer = PLANTED
    assert curves.get_title().startswith(f"layer {PLANTED} (planted frozen)")
    best = curves.lines[1].get_ydata()
    np.testing.assert_allclose(best, ds["loss_ref"].sel(layer=PLANTED, bits=32).min("permutation").values)
    lines = [line for line in gaps.lines if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["32 bits (full)", "4 bits", "1.58 bits (ternary)", "1 bit"]
    np.testing.assert_allclose(lines[2].get_ydata(), ds.peel.best().sel(layer=PLANTED, bits=1.58).values)
    assert bytes(viewer.heatmap_image.value) == heatmap  # the heatmap does not depend on the layer


def test_a_dataset_with_missing_cells_plots_them_as_nan_and_never_flags_them():
    holes = synthetic_result(steps=6, layers=4, permutations=2, bits=[4, 32], planted=1, nan_fraction=0.5, seed=3)
    best = _best(holes, 32)
    assert np.isnan(best).any() and np.isfinite(best).any()
    viewer = peelnb.explore(holes)
    np.testing.assert_array_equal(np.isnan(viewer.plotted.values), np.isnan(best))
    missing = {(int(holes["step"][j]), int(holes["layer"][i])) for i, j in zip(*np.nonzero(np.isnan(best)))}
    assert missing and not missing & set(viewer.flagged)
    assert viewer.flagged == _expected_flags(holes, 32)
    viewer.bits = 4
    np.testing.assert_array_equal(np.isnan(viewer.plotted.values), np.isnan(_best(holes, 4)))
    viewer.floor = 1.0
    assert len(viewer.flagged) == int(np.isfinite(_best(holes, 4)).sum())


def test_a_single_step_result_is_explored_like_any_other():
    one = synthetic_result(steps=[500], layers=4, permutations=2, bits=[1.58, 32], planted=2)
    viewer = peelnb.explore(one)
    assert viewer.step_range == (500, 500) and viewer.plotted.shape == (4, 1)
    assert viewer.controls["step_range"].options == (("500", 500),)
    viewer.bits = 1.58
    np.testing.assert_allclose(viewer.plotted.values, _best(one, 1.58))
    assert (500, 2) in viewer.flagged
    assert viewer.table["layer"].tolist()[0] == 2
    viewer.layer = 0
    assert viewer.curves_figure.axes[0].lines[0].get_xdata().tolist() == [500]


def test_refresh_reopens_a_rewritten_result_file_and_follows_the_new_steps(tmp_path):
    path = tmp_path / "peel.nc"
    peelnb.save(synthetic_result(steps=3, layers=4, permutations=2, bits=[4, 32], planted=1), path)
    viewer = peelnb.explore(path, bits=4)
    assert viewer.source == path and viewer.step_range == (0, 200) and viewer.plotted.sizes["step"] == 3
    grown = synthetic_result(steps=6, layers=4, permutations=2, bits=[4, 32], planted=1)
    peelnb.save(grown, path)
    viewer.refresh_button.click()
    assert viewer.step_range == (0, 500)
    assert viewer.plotted["step"].values.tolist() == [0, 100, 200, 300, 400, 500]
    np.testing.assert_allclose(viewer.plotted.values, _best(grown, 4))
    assert viewer.bits == 4.0 and viewer.flagged == _expected_flags(grown, 4)
    assert len(viewer.controls["step_range"].options) == 6 and viewer.controls["step_range"].value == (0, 500)
    assert "6 steps (0..500)" in viewer.status.value
    viewer.step_range = (100, 300)  # a range that stops short of the end stays where it is
    peelnb.save(synthetic_result(steps=8, layers=4, permutations=2, bits=[32], planted=1), path)
    viewer.refresh()
    assert viewer.step_range == (100, 300)
    assert viewer.bits == 32.0  # 4 bits are gone from the file: back to the default


def test_refresh_shows_the_steps_appended_to_a_growing_zarr_store(tmp_path):
    from peelnb.results import append_step

    run = synthetic_result(steps=5, layers=3, permutations=2, bits=[1.58, 32], planted=2)
    store = tmp_path / "run.zarr"
    append_step(run.isel(step=[0, 1]), store)
    viewer = peelnb.explore(store)
    assert viewer.plotted["step"].values.tolist() == [0, 100]
    append_step(run.isel(step=[2, 3, 4]), store)
    viewer.refresh()
    assert viewer.step_range == (0, 400)
    np.testing.assert_allclose(viewer.plotted.values, _best(run, 32))
    assert viewer.flagged == _expected_flags(run, 32)


def test_refresh_of_a_dataset_redraws_what_was_filled_in_place():
    live = synthetic_result(steps=4, layers=3, permutations=2, bits=[32], planted=0)
    live["loss_ref"][dict(step=3)] = np.nan
    viewer = peelnb.explore(live)
    assert np.isnan(viewer.plotted.values[:, 3]).all()
    live["loss_ref"][dict(step=3)] = live["loss_model"][3] + 0.5
    viewer.refresh()
    np.testing.assert_allclose(viewer.plotted.values[:, 3], -0.5)


@pytest.fixture(scope="module")
def unchanged(ds) -> Explorer:
    """One viewer shared by the tests that must leave it as it was."""
    return peelnb.explore(ds)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("bits", 2, r"bits=2 is not in the result; bits: \[1.0, 1.58, 4.0, 32.0\]; pass one of these"),
        ("layer", 9, r"layer=9 is not in the result; layers: \[0, 1, 2, 3, 4, 5\]; pass one of these"),
        ("step_range", (5000, 9000), r"selects no step \(an empty selection\); the result's steps run 0..700"),
        ("step_range", (300,), "must be a pair"),
        ("reduce", 7, r"reduce=7 is neither 'best', 'mean' nor one of the result's permutations \[0, 1, 2\]"),
        ("variable", "loss_model", "cannot be shown as a layer x step map; pass one of"),
        ("floor", -0.5, "floor=-0.5 must be a finite number >= 0"),
        ("noise_multiple", float("nan"), "noise_multiple=nan must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused_with_the_fix_and_leave_the_viewer_as_it_was(unchanged, name, value, message):
    viewer = unchanged
    before = (getattr(viewer, name), viewer.plotted.copy(), viewer.flagged)
    with pytest.raises(ValueError, match=message):
        setattr(viewer, name, value)
    assert getattr(viewer, name) == before[0]
    np.testing.assert_array_equal(viewer.plotted.values, before[1].values)
    assert viewer.flagged == before[2]


def test_explore_refuses_data_it_cannot_show(ds, tmp_path):
    with pytest.raises(ValueError, match="variable 'local_err' is missing.*Pass a result from peelnb.peel"):
        peelnb.explore(ds.drop_vars("local_err"))
    with pytest.raises(ValueError, match="dimension 'bits' is missing"):
        peelnb.explore(ds.isel(bits=0))
    with pytest.raises(ValueError, match="the selection is empty: no step"):
        peelnb.explore(ds.sel(step=slice(10_000, None)))
    with pytest.raises(ValueError, match="bits=8 is not in the result"):
        peelnb.explore(ds, bits=8)
    with pytest.raises(TypeError, match="explore takes a peel result"):
        peelnb.explore(42)
    with pytest.raises(FileNotFoundError):
        peelnb.explore(tmp_path / "nowhere.nc")


def test_viewing_and_plotting_never_import_torch():
    code = (
        "import sys, peelnb, peelnb.plot, peelnb.widgets\n"
        "from peelnb.testing import synthetic_result\n"
        "viewer = peelnb.explore(synthetic_result(steps=3, layers=2, permutations=2, bits=[32]))\n"
        "viewer.bits = 32\n"
        "peelnb.plot.gap_heatmap(viewer.data, bits=32)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
