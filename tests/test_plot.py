"""Figures: structure and data, not pixels."""

from __future__ import annotations

import numpy as np
import pytest

import peelnb
from peelnb import plot


@pytest.fixture(scope="module")
def example():
    return peelnb.tutorial.example_result()


def test_overview_has_a_loss_panel_and_one_gap_panel_per_bits_for_each_result(example):
    fig = plot.overview({"a": example, "b": example})
    axes = fig.get_axes()
    assert len(axes) == 2 * (1 + example.sizes["bits"])
    assert axes[0].get_ylabel() == "held-out loss (nats/token)"
    assert axes[1].get_title() == "32 (full) bits"
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
