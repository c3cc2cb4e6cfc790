"""peelnb: which layers of a transformer are not actually optimized, at every stage of training.

``peelnb.peel`` fills an xarray Dataset (dims step, layer, permutation, bits)
from checkpoints and data; ``peelnb.save``/``peelnb.open`` store it as netCDF or Zarr;
the ``ds.peel`` accessor derives gaps, noise floors, flags and a summary.
Opening, summarizing and plotting results never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .results import open, save  # noqa: E402  (registers the ds.peel accessor)

__all__ = ["PeelMonitor", "__version__", "explore", "integrations", "open", "peel", "plot", "repair", "save",
           "splice", "testing", "tutorial"]

_LAZY = {
    "peel": ("peelnb.peeling", "peel"),
    "splice": ("peelnb.peeling", "splice"),
    "repair": ("peelnb.repairing", "repair"),
    "plot": ("peelnb.plot", None),
    "tutorial": ("peelnb.tutorial", None),
    "testing": ("peelnb.testing", None),
    "explore": ("peelnb.widgets", "explore"),
    "PeelMonitor": ("peelnb.monitor", "PeelMonitor"),
    "integrations": ("peelnb.integrations", None),
}


def __getattr__(name: str) -> Any:
    """Import torch-dependent parts only when first used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'peelnb' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
