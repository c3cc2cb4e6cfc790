"""Small example data: a real peel result bundled with peelnb.

`example_result` opens a result computed by `build_example` (the quick demo's
faulty run: a 3-layer model whose layer 1 was frozen during training), so docs,
notebooks and tests can show real numbers without training anything.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import xarray as xr

from .results import open as open_result

EXAMPLE_FILE = "example_peel.nc"


def example_result() -> xr.Dataset:
    """A real peel result: 3 layers, layer 1 planted ``frozen``, 5 steps, 3 permutations, 4 bit-widths.

    Examples
    --------
    >>> ds = example_result()
    >>> ds["loss_ref"].sizes
    Frozen({'step': 5, 'layer': 3, 'permutation': 3, 'bits': 4})
    >>> int(ds.peel.summary(bits=32)["layer"][0])
    1
    """
    with importlib.resources.as_file(importlib.resources.files("peelnb") / "data" / EXAMPLE_FILE) as path:
        return open_result(path)


def build_example(folder: str | Path) -> xr.Dataset:
    """Recompute the example: train and peel the quick demo's faulty run in ``folder``.

    ``python -m peelnb.tutorial`` writes it into the package's data folder.
    """
    from .config import ModelConfig, TrainConfig
    from .data import Corpus
    from .demo import QUICK
    from .peeling import peel
    from .train import train

    corpus = Corpus.bundled()
    model = ModelConfig(vocab_size=corpus.vocab_size, n_layer=QUICK.n_layer, d_model=QUICK.d_model,
                        n_head=QUICK.n_head, n_ctx=QUICK.n_ctx)
    config = TrainConfig(steps=QUICK.steps, batch_size=QUICK.batch_size, seed=QUICK.seed, fault=QUICK.fault)
    run = train(Path(folder) / "run", model=model, config=config, corpus=corpus, progress=False)
    ds = peel(run, bits=QUICK.bits, permutations=QUICK.permutations, solver_steps=QUICK.solver_steps,
              calib_tokens=QUICK.calib_tokens, eval_tokens=QUICK.eval_tokens, seed=QUICK.seed, progress=False)
    ds.attrs["source"] = "peelnb.tutorial.build_example (quick demo, faulty run)"
    return ds


if __name__ == "__main__":
    import tempfile

    from .results import save

    with tempfile.TemporaryDirectory() as tmp:
        target = importlib.resources.files("peelnb") / "data" / EXAMPLE_FILE
        print(save(build_example(tmp), str(target)))
