"""Shared fixtures: the bundled corpus, tiny runs (seconds) and real trained runs (session-scoped)."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from peelnb.checkpoints import Run  # noqa: E402
from peelnb.config import Fault, ModelConfig, TrainConfig  # noqa: E402
from peelnb.data import Corpus  # noqa: E402
from peelnb.train import train  # noqa: E402

TINY_MODEL = dict(n_layer=2, d_model=16, n_head=2, n_ctx=16)
TINY_TRAIN = dict(steps=40, batch_size=8, warmup=5, checkpoints=(0, 20, 40), eval_every=20, eval_tokens=512)
TINY_PEEL = dict(bits=(1.58, 32), permutations=2, solver_steps=5, calib_tokens=1024, eval_tokens=256,
                 progress=False)
"""A 2-layer model trained for seconds: for mechanics, not for findings."""

REAL_MODEL = dict(n_layer=3, d_model=64, n_head=4, n_ctx=32)
REAL_TRAIN = dict(steps=1000, batch_size=32, checkpoints=(0, 500, 1000))
"""A 3-layer model trained long enough (about 30 s) for its layers to pull ahead of cheap references."""


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run fastest so, and do not fight other processes for the
    cores (Dask's workers run on one thread too: its nanny sets OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return Corpus.bundled()


def _train(folder, corpus: Corpus, model: dict, config: dict, fault: str | None) -> Run:
    return train(
        folder,
        model=ModelConfig(vocab_size=corpus.vocab_size, **model),
        config=TrainConfig(**config, fault=Fault.parse(fault) if fault else None),
        corpus=corpus,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus) -> Callable[..., Run]:
    """``tiny_run(fault=None)``: a 2-layer run trained for 40 steps, cached per fault."""
    cache: dict[str | None, Run] = {}

    def make(fault: str | None = None) -> Run:
        if fault not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{fault or 'clean'}".replace(":", "-"))
            cache[fault] = _train(folder, corpus, TINY_MODEL, TINY_TRAIN, fault)
        return cache[fault]

    return make


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, corpus) -> Callable[..., Run]:
    """``real_run(fault=None)``: a 3-layer run trained for 1000 steps, cached per fault."""
    cache: dict[str | None, Run] = {}

    def make(fault: str | None = None) -> Run:
        if fault not in cache:
            folder = tmp_path_factory.mktemp(f"real-{fault or 'clean'}".replace(":", "-"))
            cache[fault] = _train(folder, corpus, REAL_MODEL, REAL_TRAIN, fault)
        return cache[fault]

    return make
