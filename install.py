"""Run by A1111 before it loads the extension (``python install.py`` with the webui folder on
PYTHONPATH, at every start): install what requirements.txt lists and is missing or at another
version, and nothing else.

A1111's own packages are never installed, upgraded or downgraded: pip gets a constraints file
pinning each of them at the version installed now, so a dependency of ours cannot move them,
and nothing is installed at all if one of them is missing (that is a broken A1111, not ours to
repair). A second start finds everything in place and runs no pip at all.
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from typing import Optional

import launch

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
#: A1111 1.10.1 pins these; they are only ever read here, never installed.
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


def main() -> list[str]:
    """Install what is needed; returns the ``name==version`` specs handed to pip."""
    wanted = [f"{name}=={version}" for name, version in requirements()
              if name not in HOST_PACKAGES and installed_version(name) != version]
    if not wanted:
        return []
    host = {name: installed_version(name) for name in HOST_PACKAGES}
    missing = [name for name, version in host.items() if version is None]
    if missing:
        print(f"[lora-dreambooth] not installing {', '.join(wanted)}: A1111's own "
              f"{', '.join(missing)} not found. Repair the webui's environment first.")
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="lora-dreambooth-constraints-",
                                     delete=False, encoding="utf-8") as f:
        f.write("".join(f"{name}=={version}\n" for name, version in host.items()))
    try:
        launch.run_pip(f'install {" ".join(wanted)} -c "{f.name}"', f"{', '.join(wanted)} for lora-dreambooth")
    finally:
        os.remove(f.name)
    return wanted


if __name__ == "__main__":
    main()
