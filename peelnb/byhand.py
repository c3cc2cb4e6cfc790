"""One peeling problem by hand: the engine's steps for a single reference, written plainly.

`peelnb.peel` solves every (permutation, bits) reference of a layer at once,
stacked and batched. These functions do the same for one reference with a
plain block, one step at a time, for teaching
(``notebooks/02_how_peeling_works.ipynb``) and as an independent cross-check
of the engine. With the same seed they draw the same tokens, the same
initialization and the same data order as ``peel(view="replace")``, so the
held-out loss of a reference fitted here matches ``peel``'s ``loss_ref`` up to
floating-point rounding.

The steps, for checkpoint ``model`` and layer ``l``::

    calib, evaluation = windows(corpus, n_ctx=..., seed=0)      # tokens
    h = capture(model, calib)                                   # [h_0, ..., h_L]
    ref = reference_block(model.blocks[l], layer=l, n_layer=L)  # fresh weights
    fit(ref, h[l], h[l + 1], steps=50)                          # K Adam steps, local objective
    spliced = splice_block(model, l, ref)                       # a real model
    heldout_loss(spliced, evaluation)                           # verified loss (peelnb.train)
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ._optim import adam
from .adapters import adapter_for
from .config import PeelConfig, check_bits
from .data import Corpus, seeded_generator
from .model import GPT, init_block_
from .peeling import REPLACE_LR, _capture, peel_windows
from .quant import QuantLinear
from .solver import _INIT_KEY, permutation_order

_DEFAULTS = PeelConfig(view="replace")


def windows(corpus: Corpus, *, n_ctx: int, calib_tokens: int = _DEFAULTS.calib_tokens,
            eval_tokens: int = _DEFAULTS.eval_tokens, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Calibration and evaluation windows, exactly as `peelnb.peel` draws them.

    Parameters
    ----------
    corpus : Corpus
        The tokens (calibration from its training split, evaluation from its
        held-out split).
    n_ctx : int
        Context length of the model.
    calib_tokens, eval_tokens : int
        How many tokens of each (as given to ``peel``).
    seed : int
        The peel's seed.

    Returns
    -------
    calib, evaluation : Tensor
        ``(n, n_ctx + 1)`` token ids each; inputs are ``[:, :-1]``, next-token
        targets ``[:, 1:]``.

    Examples
    --------
    >>> from peelnb.data import Corpus
    >>> calib, evaluation = windows(Corpus.bundled(), n_ctx=32, calib_tokens=1024, eval_tokens=256)
    >>> tuple(calib.shape), tuple(evaluation.shape)
    ((32, 33), (8, 33))
    """
    return peel_windows(corpus, n_ctx, calib_tokens=calib_tokens, eval_tokens=eval_tokens, seed=seed)


def capture(model: GPT, windows: Tensor) -> list[Tensor]:
    """Hidden states ``[h_0, ..., h_L]`` of ``windows`` from one hooked forward pass.

    ``h_l`` is the input of block ``l`` (``h_0`` the embeddings) and
    ``h_{l+1}`` its output; each is ``(N, T, C)``. This is the engine's own
    capture: hooks on every block, removed afterwards.

    Parameters
    ----------
    model : GPT
        The checkpoint (put in eval mode).
    windows : Tensor
        ``(N, T + 1)`` token ids; the model reads ``windows[:, :-1]``.

    Returns
    -------
    list of Tensor
        ``L + 1`` tensors of shape ``(N, T, C)``.

    Examples
    --------
    >>> from peelnb.config import ModelConfig
    >>> model = GPT(ModelConfig(vocab_size=10, n_layer=2, d_model=8, n_head=2, n_ctx=4))
    >>> h = capture(model, torch.zeros(3, 5, dtype=torch.long))
    >>> len(h), tuple(h[0].shape)
    (3, (3, 4, 8))
    """
    model.eval()
    return list(_capture(adapter_for(model), model, windows))


def reference_block(block: nn.Module, *, layer: int, n_layer: int, bits: float = 32.0, permutation: int = 0,
                    seed: int = 0) -> nn.Module:
    """A fresh block of the trained block's architecture, initialized as `peel` initializes it.

    The replace view's reference: same shapes as ``block``, weights drawn
    anew (GPT-2 initialization, seeded by ``(seed, layer, permutation)``),
    linear weights fake-quantized to ``bits`` in every forward pass (the
    stored weights stay full precision while it is trained; gradients pass
    straight through the rounding).

    Parameters
    ----------
    block : nn.Module
        The trained block (left unchanged).
    layer, n_layer : int
        Its index and the model's depth (the initialization scales with depth).
    bits : float
        Bit-width of the reference's linear weights (1, 1.58, 2, 3, 4, 8, 32).
    permutation, seed : int
        Which of ``peel``'s references to reproduce.

    Returns
    -------
    nn.Module
        The reference, trainable, in train mode.

    Examples
    --------
    >>> from peelnb.config import ModelConfig
    >>> model = GPT(ModelConfig(vocab_size=10, n_layer=2, d_model=8, n_head=2, n_ctx=4))
    >>> ref = reference_block(model.blocks[1], layer=1, n_layer=2, bits=1.58)
    >>> ref.mlp.c_fc.bits, bool((ref.mlp.c_fc.weight == model.blocks[1].mlp.c_fc.weight).all())
    (1.58, False)
    """
    bits = check_bits(bits)
    reference = copy.deepcopy(block).train().requires_grad_(True)
    init_block_(reference, n_layer, seeded_generator(seed, _INIT_KEY, layer, permutation))
    for module in reference.modules():
        if isinstance(module, QuantLinear):
            module.bits = bits
    return reference


def local_loss(reference: nn.Module, x: Tensor, y: Tensor, *, scale: Tensor | float | None = None) -> Tensor:
    """The replace view's local objective: squared error against the trained output, relative.

    ``mean((reference(x) - y)^2) / scale``, with ``scale`` the mean squared
    residual contribution ``mean((y - x)^2)`` of the trained block: 1.0 means
    the reference misses by as much as the block contributes, 0.0 means it
    reproduces the block exactly.

    Parameters
    ----------
    reference : nn.Module
        The block being fitted.
    x, y : Tensor
        Inputs and the trained block's outputs, ``(N, T, C)``.
    scale : Tensor or float, optional
        Default ``mean((y - x)^2)`` of these ``x, y``; `fit` passes the value
        over all calibration data, so that every batch is scaled alike.

    Returns
    -------
    Tensor
        A scalar.

    Examples
    --------
    >>> x, y = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    >>> float(local_loss(nn.Identity(), x, y))
    1.0
    """
    if scale is None:
        scale = (y - x).pow(2).mean().clamp_min(1e-12)
    return (reference(x) - y).pow(2).mean() / scale


def fit(reference: nn.Module, x: Tensor, y: Tensor, *, steps: int = _DEFAULTS.solver_steps,
        lr: float = REPLACE_LR, batch_size: int | None = None, permutation: int = 0, seed: int = 0) -> list[float]:
    """Train ``reference`` in place with K Adam steps on the local objective.

    Step ``k`` uses the calibration sequences at positions ``k * batch_size``
    onwards in the order of ``permutation`` (0: natural order; p >= 1: a
    shuffle seeded by p), as `peel`'s solver does.

    Parameters
    ----------
    reference : nn.Module
        The block to train (from `reference_block`).
    x, y : Tensor
        The trained block's captured inputs ``h_{l}`` and outputs ``h_{l+1}``,
        ``(N, T, C)`` each.
    steps : int
        K, the lightweight budget.
    lr : float
        Adam learning rate (``peel``'s replace default).
    batch_size : int, optional
        Sequences per step (default ``peel``'s, 2 for the replace view).
    permutation, seed : int
        The data order.

    Returns
    -------
    list of float
        The local loss of the batch at each step, before its update.

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(8, 4, 3)
    >>> losses = fit(nn.Linear(3, 3), x, 2 * x, steps=100, lr=0.05)
    >>> losses[-1] < 0.1 * losses[0]
    True
    """
    batch_size = batch_size or _DEFAULTS.batch_size
    n = x.shape[0]
    order = permutation_order(n, permutation, seed)
    scale = (y - x).pow(2).mean().clamp_min(1e-12)
    optimizer = adam(reference.parameters(), lr=lr)
    losses = []
    for k in range(steps):
        index = order[(k * batch_size + torch.arange(batch_size)) % n]
        loss = local_loss(reference, x[index], y[index], scale=scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def local_error(reference: nn.Module, x: Tensor, y: Tensor) -> float:
    """Relative L2 error of ``reference(x)`` against ``y``, on the scale of the block's contribution ``y - x``.

    The result's ``local_err``: ``sqrt(sum((reference(x) - y)^2) / sum((y - x)^2))``.

    Examples
    --------
    >>> x, y = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    >>> local_error(nn.Identity(), x, y)
    1.0
    """
    return ((reference(x) - y).pow(2).sum() / (y - x).pow(2).sum().clamp_min(1e-24)).sqrt().item()


def splice_block(model: GPT, layer: int, block: nn.Module) -> GPT:
    """A copy of ``model`` with block ``layer`` replaced by a copy of ``block``, in eval mode.

    Examples
    --------
    >>> from peelnb.config import ModelConfig
    >>> model = GPT(ModelConfig(vocab_size=10, n_layer=2, d_model=8, n_head=2, n_ctx=4))
    >>> spliced = splice_block(model, 0, model.blocks[1])
    >>> bool((spliced.blocks[0].mlp.c_fc.weight == model.blocks[1].mlp.c_fc.weight).all())
    True
    """
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer {layer} is out of range: the model has {len(model.blocks)} layers")
    spliced = copy.deepcopy(model)
    spliced.blocks[layer] = copy.deepcopy(block)
    return spliced.eval().requires_grad_(False)
