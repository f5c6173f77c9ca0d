"""Run by A1111 before it loads the extension (``python install.py`` with the webui folder on
PYTHONPATH, at every start): install what requirements.txt lists and is missing or at another
version, and nothing else.

Nothing already installed is upgraded or downgraded: pip gets a constraints file pinning
every installed distribution (A1111's and its other extensions') at the version installed now,
except the ones of ours being replaced, so a dependency of ours cannot move any of them. Nothing
is installed at all if one of A1111's core packages is missing (that is a broken A1111, not ours
to repair). A second start finds everything in place and runs no pip at all.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
from typing import Optional

import launch

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
#: A1111 1.10.1 pins these; they are never installed, and without them nothing is.
HOST_PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "safetensors", "gradio",
                 "fastapi", "pydantic")


def requirements(path: str = REQUIREMENTS) -> list[tuple[str, str]]:
    """``name==version`` lines of requirements.txt."""
    pinned = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pinned.append((name.strip(), version.strip()))
    return pinned


def installed_version(name: str) -> Optional[str]:
    if not launch.is_installed(name):
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503: case and ``-_.`` runs do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Every installed distribution's name → version (the first found, as Python imports it)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            found.setdefault(canonical(name), dist.version)
    return found


def main() -> list[str]:
    """Install what is needed; returns the ``name==version`` specs handed to pip."""
    wanted = [f"{name}=={version}" for name, version in requirements()
              if name not in HOST_PACKAGES and installed_version(name) != version]
    if not wanted:
        return []
    missing = [name for name in HOST_PACKAGES if installed_version(name) is None]
    if missing:
        print(f"[lora-dreambooth] not installing {', '.join(wanted)}: A1111's own "
              f"{', '.join(missing)} not found. Repair the webui's environment first.")
        return []
    replaced = {canonical(spec.partition("==")[0]) for spec in wanted}
    pins = {name: version for name, version in installed_distributions().items() if name not in replaced}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="lora-dreambooth-constraints-",
                                     delete=False, encoding="utf-8") as f:
        f.write("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    try:
        launch.run_pip(f'install {" ".join(wanted)} -c "{f.name}"', f"{', '.join(wanted)} for lora-dreambooth")
    finally:
        os.remove(f.name)
    return wanted


if __name__ == "__main__":
    main()
