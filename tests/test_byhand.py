"""The by-hand peel (one plain block, one step at a time) reproduces the batched engine."""

from __future__ import annotations

import pytest
import torch

import peelnb
from peelnb import byhand
from peelnb.train import heldout_loss

from .conftest import TINY_PEEL

K = 8


@pytest.mark.parametrize(("layer", "bits", "permutation"), [(0, 32.0, 0), (1, 1.58, 1)])
def test_a_reference_fitted_by_hand_matches_peel(tiny_run, corpus, layer, bits, permutation):
    run = tiny_run()
    step = run.steps[-1]
    model = run.load(step).model
    n_ctx = model.config.n_ctx
    sizes = {"calib_tokens": TINY_PEEL["calib_tokens"], "eval_tokens": TINY_PEEL["eval_tokens"]}
    calib, evaluation = byhand.windows(corpus, n_ctx=n_ctx, **sizes)
    h, h_eval = byhand.capture(model, calib), byhand.capture(model, evaluation)
    reference = byhand.reference_block(model.blocks[layer], layer=layer, n_layer=len(model.blocks), bits=bits,
                                       permutation=permutation)
    losses = byhand.fit(reference, h[layer], h[layer + 1], steps=K, permutation=permutation)
    hand_loss = heldout_loss(byhand.splice_block(model, layer, reference), evaluation)
    hand_err = byhand.local_error(reference.eval(), h_eval[layer], h_eval[layer + 1])

    ds = peelnb.peel(run, bits=(bits,), permutations=(0, permutation) if permutation else (0,), layers=(layer,),
                     solver_steps=K, progress=False, **sizes)
    at = {"step": step, "layer": layer, "bits": bits, "permutation": permutation}
    assert len(losses) == K
    assert hand_loss == pytest.approx(float(ds["loss_ref"].sel(at)), abs=1e-5)
    assert hand_err == pytest.approx(float(ds["local_err"].sel(at)), rel=1e-4)
    # the trained model itself, measured the plain way, is the result's loss_model
    assert heldout_loss(model, evaluation) == pytest.approx(float(ds["loss_model"].sel(step=step)), abs=1e-5)


def test_fitting_reduces_the_local_loss_and_leaves_the_trained_block_alone(tiny_run, corpus):
    model = tiny_run().load(40).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib, _ = byhand.windows(corpus, n_ctx=model.config.n_ctx, calib_tokens=1024, eval_tokens=256)
    h = byhand.capture(model, calib)
    reference = byhand.reference_block(model.blocks[1], layer=1, n_layer=2)
    start = byhand.local_loss(reference, h[1], h[2]).item()
    byhand.fit(reference, h[1], h[2], steps=30, batch_size=8)
    assert byhand.local_loss(reference, h[1], h[2]).item() < 0.5 * start
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_splicing_a_layer_out_of_range_names_the_depth(tiny_run):
    model = tiny_run().load(40).model
    with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
        byhand.splice_block(model, 2, model.blocks[0])
