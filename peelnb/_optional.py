"""Optional dependencies: imported when first needed, with an error naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise an ImportError saying which peelnb extra installs it.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``"transformers"``.
    extra : str
        The peelnb extra that installs it, e.g. ``"hf"``.
    purpose : str
        What needs it, for the message (e.g. "loading a Hugging Face model folder").

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        Naming ``pip install "peelnb[<extra>]"``.

    Examples
    --------
    >>> require("json", "none", "this example").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the optional dependency {module!r}, which is not installed: "
            f'pip install "peelnb[{extra}]"'
        ) from err


def transformers() -> ModuleType:
    """The ``transformers`` package (the ``[hf]`` extra)."""
    return require("transformers", "hf", "peeling Hugging Face models")
