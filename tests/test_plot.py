"""Figures: structure and data, not pixels."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import SymLogNorm

import peelnb
from peelnb import plot
from peelnb.testing import synthetic_result


@pytest.fixture(scope="module")
def example():
    return peelnb.tutorial.example_result()


def test_overview_has_a_loss_panel_and_one_gap_panel_per_bits_for_each_result(example):
    fig = plot.overview({"a": example, "b": example})
    axes = fig.get_axes()
    assert len(axes) == 2 * (1 + example.sizes["bits"])
    assert axes[0].get_ylabel() == "held-out loss (nats/token)"
    assert axes[1].get_title() == "32 bits (full)"
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), example["loss_model"].values)


def test_gap_lines_plot_the_best_gap_of_every_layer_and_highlight_the_planted_one(example):
    ax = plot.gap_lines(example, bits=1.58)
    labelled = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert sorted(labelled) == ["layer 0", "layer 1 (planted frozen)", "layer 2"]
    planted = labelled["layer 1 (planted frozen)"]
    np.testing.assert_allclose(planted.get_ydata(), example.peel.best().sel(layer=1, bits=1.58).values)
    assert planted.get_linewidth() > labelled["layer 0"].get_linewidth()
    assert ax.get_ylabel() == "best gap (nats/token)"


def test_plots_refuse_a_bits_value_not_in_the_data(example):
    with pytest.raises(ValueError, match="bits=2 is not in the result"):
        plot.gap_lines(example, bits=2)


def test_plots_refuse_a_dataset_without_the_schema(example):
    with pytest.raises(ValueError, match="variable 'loss_ref' is missing"):
        plot.overview(example.drop_vars("loss_ref"))


# ----- gap_heatmap, layer_curves, bits_profile --------------------------------------------------------------------

BITS = [1.0, 1.58, 2.0, 4.0, 8.0, 32.0]


@pytest.fixture(scope="module")
def big():
    """50 steps x 24 layers x 5 permutations x 6 bits, layer 7 planted, a few cells missing."""
    return synthetic_result(steps=50, layers=24, permutations=5, bits=BITS, planted=7, nan_fraction=0.02, seed=1)


def _labels_overlap(labels) -> bool:
    boxes = [label.get_window_extent() for label in labels if label.get_visible() and label.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_gap_heatmap_shows_the_best_gap_as_layers_by_steps_with_a_labelled_colorbar_centred_at_zero(big):
    ax = plot.gap_heatmap(big, bits=1.58)
    image = ax.images[0]
    array = image.get_array()
    expected = big.peel.best().sel(bits=1.58).transpose("layer", "step").values
    assert array.shape == (24, 50)
    np.testing.assert_array_equal(np.ma.getmaskarray(array), np.isnan(expected))
    np.testing.assert_allclose(array.filled(np.nan), expected)
    assert len(ax.figure.get_axes()) == 2  # the heatmap and its colorbar
    assert image.colorbar.ax.get_ylabel() == "best gap: trained - reference (nats/token)"
    assert isinstance(image.norm, SymLogNorm) and image.norm.vmin == -image.norm.vmax
    assert image.get_cmap().name.startswith("RdBu_r")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "layer")
    assert "1.58 bits (ternary)" in ax.get_title()


def test_gap_heatmap_puts_the_largest_value_in_the_planted_layers_row_and_labels_that_row(big):
    ax = plot.gap_heatmap(big, bits=32)
    array = ax.images[0].get_array().filled(-np.inf)
    row, _ = np.unravel_index(np.argmax(array), array.shape)
    assert row == 7
    assert (array.argmax(axis=0) == 7).all()  # at every step
    labels = {t.get_text(): t for t in ax.get_yticklabels()}
    assert labels["7 (planted frozen)"].get_color() == plot.PLANTED_COLOR


def test_gap_heatmap_on_the_real_example_ranks_the_frozen_layer_first_once_training_has_started(example):
    array = plot.gap_heatmap(example, bits=32).images[0].get_array()
    assert (array[:, 1:].argmax(axis=0) == 1).all()


def test_gap_heatmap_marks_exactly_the_flagged_cells(big):
    ax = plot.gap_heatmap(big, bits=4, floor=0.02, noise_multiple=2.0)
    marked = {tuple(map(int, xy)) for xy in ax.collections[0].get_offsets()}
    flags = big.peel.flagged(floor=0.02, noise_multiple=2.0).sel(bits=4).transpose("layer", "step").values
    assert marked == {(int(step), int(layer)) for layer, step in zip(*np.nonzero(flags))}
    assert {(s, 7) for s in range(50)} <= marked and len(marked) < 24 * 50


def test_gap_heatmap_tick_labels_do_not_overlap_with_many_layers_and_steps(big):
    for ax in (plot.gap_heatmap(big, bits=32), plt.subplots(figsize=(4, 3))[1]):
        if not ax.images:
            plot.gap_heatmap(big.isel(layer=slice(0, 12)), bits=32, ax=ax)
        ax.figure.canvas.draw()
        assert not _labels_overlap(ax.get_xticklabels())
        assert not _labels_overlap(ax.get_yticklabels())
        assert 2 <= len(ax.get_xticklabels()) < 50 and 2 <= len(ax.get_yticklabels()) <= 24


@pytest.mark.parametrize("reduce", ["mean", 3])
def test_gap_heatmap_reduces_permutations_as_asked(big, reduce):
    array = plot.gap_heatmap(big, bits=8, reduce=reduce).images[0].get_array()
    ref = big["loss_ref"].sel(bits=8)
    ref = ref.mean("permutation") if reduce == "mean" else ref.sel(permutation=reduce)
    expected = (big["loss_model"] - ref).transpose("layer", "step").values
    np.testing.assert_allclose(array.filled(np.nan), expected)


def test_gap_heatmap_shows_other_variables_on_a_sequential_scale_with_their_units(big):
    ax = plot.gap_heatmap(big, bits=2, variable="local_err")
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan),
                               big["local_err"].sel(bits=2).min("permutation").transpose("layer", "step").values)
    assert ax.images[0].colorbar.ax.get_ylabel() == "best reference: relative error of the reference's output"
    assert not isinstance(ax.images[0].norm, SymLogNorm)
    ax = plot.gap_heatmap(big, bits=2, variable="loss_model_q")
    np.testing.assert_allclose(ax.images[0].get_array(), big["loss_model_q"].sel(bits=2).T.values)
    assert ax.images[0].colorbar.ax.get_ylabel().endswith("(nats/token)")


def test_gap_heatmap_works_on_a_single_step(big):
    one = big.isel(step=[10])
    ax = plot.gap_heatmap(one, bits=32)
    assert ax.images[0].get_array().shape == (24, 1)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1000"]


def test_layer_curves_draw_the_trained_loss_the_best_reference_and_the_permutation_band(big):
    ax = plot.layer_curves(big, layer=3, bits=4)
    lines = {line.get_label(): line for line in ax.lines}
    assert sorted(lines) == ["best reference", "round-to-nearest, 4 bits", "trained model"]
    np.testing.assert_allclose(lines["trained model"].get_ydata(), big["loss_model"].values)
    ref = big["loss_ref"].sel(layer=3, bits=4)
    np.testing.assert_allclose(lines["best reference"].get_ydata(), ref.min("permutation").values)
    np.testing.assert_allclose(lines["round-to-nearest, 4 bits"].get_ydata(),
                               big["loss_model_q"].sel(layer=3, bits=4).values)
    (band,) = ax.collections
    low, high = ref.min("permutation").values, ref.max("permutation").values
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    for step, lo, hi in zip(big["step"].values, low, high):
        if np.isfinite(lo):
            ys = np.unique(vertices[vertices[:, 0] == step, 1])
            np.testing.assert_allclose(ys, [lo, hi])
    assert ax.get_ylabel() == "held-out loss (nats/token)" and ax.get_xlabel() == "training step"
    assert ax.get_legend() is not None


def test_layer_curves_of_the_planted_layer_say_so_and_omit_round_to_nearest_at_full_precision(big):
    ax = plot.layer_curves(big, layer=7, bits=32)
    assert "planted frozen" in ax.get_title()
    assert [line.get_label() for line in ax.lines] == ["trained model", "best reference"]


def test_bits_profile_plots_the_best_gap_and_the_round_to_nearest_baseline_against_bits(example):
    ax = plot.bits_profile(example, step=150)
    lines = {line.get_label(): line for line in ax.lines}
    for layer in (0, 2):
        np.testing.assert_allclose(lines[f"layer {layer}"].get_ydata(),
                                   example.peel.best().sel(step=150, layer=layer).values)
        baseline = lines[f"_layer {layer} round-to-nearest"]
        np.testing.assert_allclose(baseline.get_ydata(),
                                   (example["loss_model"] - example["loss_model_q"]).sel(step=150, layer=layer))
        assert baseline.get_linestyle() == "--"
    assert lines["layer 1 (planted frozen)"].get_color() == plot.PLANTED_COLOR
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "1.58\nternary", "4", "32\nfull"]
    assert ax.get_ylabel() == "gap: trained - reference (nats/token)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["best reference", "round-to-nearest"] and len(legend) == 2 + 3


def test_bits_profile_of_chosen_layers_sorts_bits_and_keeps_the_legend_readable_with_many_layers(big):
    ax = plot.bits_profile(big, step=4900, layers=[7])
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert labels == ["layer 7 (planted frozen)"]
    ax = plot.bits_profile(big, step=4900)
    ax.figure.canvas.draw()
    assert len([line for line in ax.lines if not line.get_label().startswith("_")]) == 24
    assert not _labels_overlap(ax.get_legend().get_texts())
    assert not _labels_overlap(ax.get_xticklabels())


def test_overview_stays_readable_with_many_layers_and_steps(big):
    fig = plot.overview(big, bits=[32, 1.58])
    fig.canvas.draw()
    assert len(fig.get_axes()) == 3
    for ax in fig.get_axes():
        assert not _labels_overlap(ax.get_xticklabels())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ds: plot.gap_heatmap(ds.drop_vars("loss_model"), bits=32), "variable 'loss_model' is missing.*Pass"),
        (lambda ds: plot.layer_curves(ds.isel(permutation=0), layer=0, bits=32), "dimension 'permutation' is missing"),
        (lambda ds: plot.gap_heatmap(ds, bits=3), r"bits=3 is not in the result.*pass one of these"),
        (lambda ds: plot.layer_curves(ds, layer=5, bits=32), r"layer=5 is not in the result; layers: \[0, 1, 2\]"),
        (lambda ds: plot.bits_profile(ds, step=10), r"step=10 is not in the result; steps: \[0, 75"),
        (lambda ds: plot.gap_heatmap(ds.sel(step=slice(1000, None)), bits=32), "selection is empty: no step"),
        (lambda ds: plot.bits_profile(ds, step=0, layers=[]), "layers is empty"),
        (lambda ds: plot.gap_heatmap(ds, bits=32, reduce="median"), "reduce='median' is neither"),
        (lambda ds: plot.gap_heatmap(ds, bits=32, variable="loss_model"), "cannot be shown as a layer x step map"),
        (lambda ds: plot.gap_heatmap(ds, bits=32, floor=-0.1), "floor=-0.1 must be a finite number >= 0"),
    ],
)
def test_plots_refuse_bad_input_saying_what_to_pass(example, call, message):
    with pytest.raises(ValueError, match=message):
        call(example)
