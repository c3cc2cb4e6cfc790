"""`peelnb.repair`: headroom references spliced into a copy of the model, its held-out loss measured."""

from __future__ import annotations

import numpy as np
import pytest

import peelnb
from peelnb.checkpoints import state_hash
from peelnb.peeling import peel_windows, splice
from peelnb.train import heldout_loss

from .conftest import TINY_PEEL

FINAL = 40


@pytest.fixture(scope="module")
def noisy(tiny_run, tmp_path_factory):
    """A run whose layer 1 got noise after training, its headroom peel, and the exported references."""
    run = tiny_run("noise:1")
    folder = tmp_path_factory.mktemp("references")
    ds = peelnb.peel(run, view="headroom", references=folder, **TINY_PEEL)
    return run, ds, folder


def _eval_windows(run, ds):
    return peel_windows(run.corpus(), ds.attrs["n_ctx"], calib_tokens=TINY_PEEL["calib_tokens"],
                        eval_tokens=TINY_PEEL["eval_tokens"], seed=ds.attrs["seed"])[1]


@pytest.mark.parametrize("bits", [32, 1.58])
def test_repairing_the_damaged_layer_lowers_the_loss_and_reproduces_the_recorded_loss(noisy, bits):
    run, ds, folder = noisy
    model = run.load(FINAL).model
    before = state_hash(model.state_dict())
    repaired, loss = peelnb.repair(model, ds, references=folder, layers=[1], bits=bits)
    best = float(ds["loss_ref"].sel(step=FINAL, layer=1, bits=bits).min())
    assert loss == pytest.approx(best, abs=1e-5)  # trust, but verify: the peel's own number
    assert loss == pytest.approx(heldout_loss(repaired, _eval_windows(run, ds)), abs=1e-6)
    if bits == 32:
        assert loss < float(ds["loss_model"].sel(step=FINAL))
    assert state_hash(model.state_dict()) == before  # the model given is left as it was
    assert state_hash(repaired.blocks[0].state_dict()) == state_hash(model.blocks[0].state_dict())
    assert state_hash(repaired.blocks[1].state_dict()) != state_hash(model.blocks[1].state_dict())


def test_repairing_several_layers_measures_the_combination(noisy):
    run, ds, folder = noisy
    model = run.load(FINAL).model
    repaired, loss = peelnb.repair(model, ds, references=folder, layers=[0, 1])
    by_hand = model
    for layer in (0, 1):
        cells = ds["loss_ref"].sel(step=FINAL, layer=layer, bits=32)
        by_hand = splice(by_hand, folder, step=FINAL, layer=layer, bits=32,
                         permutation=int(cells["permutation"][int(np.argmin(cells.values))]))
    assert loss == pytest.approx(heldout_loss(by_hand, _eval_windows(run, ds)), abs=1e-6)
    for a, b in zip(repaired.state_dict().values(), by_hand.state_dict().values()):
        assert bool((a == b).all())


def test_default_layers_are_the_flagged_ones(noisy):
    run, ds, folder = noisy
    flagged = ds.peel.flagged().sel(step=FINAL, bits=32)
    expected = [int(layer) for layer in flagged["layer"].values[flagged.values]]
    model = run.load(FINAL).model
    _, loss = peelnb.repair(model, ds, references=folder)
    _, explicit = peelnb.repair(model, ds, references=folder, layers=expected)
    assert loss == explicit
    if not expected:
        assert loss == pytest.approx(float(ds["loss_model"].sel(step=FINAL)), abs=1e-5)


def test_repair_refuses_what_it_cannot_repair(noisy, tiny_run):
    run, ds, folder = noisy
    model = run.load(FINAL).model
    with pytest.raises(ValueError, match="view='headroom'"):
        peelnb.repair(model, ds.assign_attrs(target="output", view="replace"), references=folder, layers=[1])
    with pytest.raises(ValueError, match="not the checkpoint the peel read at step 40"):
        peelnb.repair(run.load(20).model, ds, references=folder, layers=[1])
    with pytest.raises(ValueError, match="bits=4 is not in the result"):
        peelnb.repair(model, ds, references=folder, layers=[1], bits=4)
    with pytest.raises(ValueError, match="layer 5 was not peeled"):
        peelnb.repair(model, ds, references=folder, layers=[5])
    with pytest.raises(FileNotFoundError, match="no exported reference"):
        peelnb.repair(model, ds, references=folder / "elsewhere", layers=[1])
