"""Adapters: stacked blocks equal single blocks; capture is clean; the self-check catches impure blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peelnb
from peelnb.adapters import Adapter, GPTAdapter, adapter_for
from peelnb.config import ModelConfig
from peelnb.model import GPT
from peelnb.peeling import _capture, _self_check

from .conftest import TINY_PEEL

CONFIG = ModelConfig(vocab_size=11, n_layer=3, d_model=16, n_head=2, n_ctx=8)


def _stacked_copies(block: nn.Module, R: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """R perturbed copies of a block's parameters, stacked."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.stack([p + 0.1 * torch.randn(p.shape, generator=generator) for _ in range(R)])
        for name, p in block.named_parameters()
    }


class _Generic(GPTAdapter):
    """The GPT adapter without its fast stacked block: uses the generic vmap path."""

    stacked_call = Adapter.stacked_call


@pytest.mark.parametrize("adapter", [GPTAdapter(), _Generic()], ids=["fast", "generic"])
def test_stacked_call_equals_each_block_run_alone(adapter):
    model = GPT(CONFIG, seed=1)
    block = model.blocks[1]
    params = _stacked_copies(block, R=4)
    h = torch.randn(4, 3, 8, 16, generator=torch.Generator().manual_seed(2))
    stacked = adapter.stacked_call(block, params, h)
    for r in range(4):
        single = copy.deepcopy(block)
        single.load_state_dict({k: v[r] for k, v in params.items()})
        torch.testing.assert_close(stacked[r], single(h[r]), rtol=1e-5, atol=1e-5)


def test_capture_keeps_every_block_input_leaves_outputs_unchanged_and_removes_its_hooks():
    model = GPT(CONFIG, seed=1).eval()
    idx = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(idx[:, :-1])
        hidden = _capture(GPTAdapter(), model, idx)
        after = model(idx[:, :-1])
    assert len(hidden) == CONFIG.n_layer + 1
    torch.testing.assert_close(hidden[0], model.embed(idx[:, :-1]))
    torch.testing.assert_close(model.head(hidden[-1]), expected)
    assert torch.equal(after, expected)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


def test_capture_removes_its_hooks_even_when_the_forward_pass_fails():
    model = GPT(CONFIG, seed=1).eval()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _capture(GPTAdapter(), model, torch.zeros(2, 20, dtype=torch.long))
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)


class _Noisy(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inner = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1e-2 * torch.randn_like(x)


def test_self_check_names_the_layer_whose_replay_differs():
    model = GPT(CONFIG, seed=1).eval()
    model.blocks[2] = _Noisy(model.blocks[2])
    adapter = GPTAdapter()
    hidden = _capture(adapter, model, torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="self-check failed at step 7, layer 2"):
        _self_check(adapter, model, hidden, step=7)


def test_an_unknown_architecture_gets_an_error_saying_how_to_describe_it():
    with pytest.raises(TypeError, match="subclass peelnb.adapters.Adapter"):
        adapter_for(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="does not know how to find the decoder blocks of Sequential"):
        peelnb.peel({0: nn.Sequential(nn.Linear(3, 3))}, **TINY_PEEL)
