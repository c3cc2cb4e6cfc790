"""Binder launches the notebooks: its spec installs every import they use and agrees with pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NOTEBOOK_EXTRAS = ("hf",)
"""Extras the notebooks need (04 builds a Hugging Face GPT-NeoX): Binder installs them too, pinned."""


def _binder_requirements() -> tuple[dict[str, Requirement], list[str]]:
    """Requirements of binder/requirements.txt by canonical name, and its pip options."""
    requirements, options = {}, []
    for line in (BINDER / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        requirement = Requirement(line)
        requirements[canonicalize_name(requirement.name)] = requirement
    return requirements, options


def _runtime_dependencies(extras: tuple[str, ...] = ()) -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies and those of ``extras``, by canonical name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"], *(line for extra in extras for line in project["optional-dependencies"][extra])]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _pinned_version(requirement: Requirement) -> str:
    pins = [s.version for s in requirement.specifier if s.operator == "=="]
    assert len(pins) == 1, f"binder/requirements.txt: pin {requirement.name} to one version with ==, got {requirement}"
    return pins[0]


def _imports(source: str) -> set[str]:
    """Top-level modules imported by a code cell (IPython magics and shell lines dropped)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _notebook_imports() -> dict[str, set[str]]:
    """Module name -> notebooks importing it."""
    used: dict[str, set[str]] = {}
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                for name in _imports(cell.source):
                    used.setdefault(name, set()).add(path.name)
    return used


def test_binder_installs_torch_as_the_cpu_build():
    requirements, options = _binder_requirements()
    assert f"--extra-index-url {CPU_INDEX}" in options
    assert "torch" in requirements, "binder/requirements.txt must pin torch (the CPU build)"
    assert _runtime_dependencies()["torch"].specifier.contains(_pinned_version(requirements["torch"]))


def test_binder_spec_and_pyproject_runtime_dependencies_agree():
    requirements, _ = _binder_requirements()
    runtime = _runtime_dependencies(NOTEBOOK_EXTRAS)
    missing = sorted(set(runtime) - set(requirements))
    extra = sorted(set(requirements) - set(runtime))
    assert not missing, f"pyproject.toml needs {missing}; add them, pinned, to binder/requirements.txt"
    assert not extra, (f"binder/requirements.txt installs {extra}, which neither pyproject.toml's dependencies nor "
                       f"its extras {NOTEBOOK_EXTRAS} list")
    for name, requirement in requirements.items():
        version = _pinned_version(requirement)
        assert runtime[name].specifier.contains(version, prereleases=True), (
            f"binder pins {requirement} but pyproject.toml asks for {runtime[name]}: make them agree"
        )


def test_binder_installs_the_package_itself():
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable (chmod +x)"
    lines = [line.strip() for line in post_build.read_text(encoding="utf-8").splitlines()]
    assert lines[0].startswith("#!")
    assert "pip install -e ." in lines
    assert re.fullmatch(r"python-3\.\d+", (BINDER / "runtime.txt").read_text(encoding="utf-8").strip())


def test_every_notebook_import_is_installed_by_the_binder_spec():
    requirements, _ = _binder_requirements()
    used = _notebook_imports()
    assert "peelnb" in used, "the notebooks should import peelnb"
    providers = importlib.metadata.packages_distributions()
    unprovided = {}
    for module, notebooks in sorted(used.items()):
        if module in sys.stdlib_module_names or module == "peelnb":
            continue
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        if not distributions & set(requirements):
            unprovided[module] = sorted(notebooks)
    assert not unprovided, (
        f"notebooks import modules binder/requirements.txt does not install: {unprovided}; "
        "add their distributions to pyproject.toml's dependencies (or NOTEBOOK_EXTRAS) and to binder/requirements.txt"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import numpy as np\nfrom peelnb.data import Corpus\n%matplotlib inline\nimport os.path",
         {"numpy", "peelnb", "os"}),
        ("from . import x\nimport a.b, c", {"a", "c"}),
    ],
)
def test_import_scanner_finds_top_level_modules(source, expected):
    assert _imports(source) == expected


def test_readme_launches_the_quickstart_on_binder():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\(https://mybinder\.org/v2/gh/[^/\s]+/peelnb/HEAD\?labpath=notebooks%2F([^)\s]+)\)", readme)
    assert links, "README.md needs a 'launch on Binder' link to a notebook"
    assert all((ROOT / "notebooks" / name).is_file() for name in links), f"Binder links to missing notebooks: {links}"
    assert "https://mybinder.org/badge_logo.svg" in readme
