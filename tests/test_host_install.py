"""install.py against a stand-in ``launch`` and a fake set of installed packages."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import sys
from types import SimpleNamespace

import pytest

from a1111_stub.harness import ROOT, STUB

#: What A1111 1.10.1 has installed (its pins), before our extension is added.
A1111_PACKAGES = {"torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "transformers": "4.30.2",
                  "accelerate": "0.21.0", "safetensors": "0.4.2", "gradio": "3.41.2", "fastapi": "0.94.0",
                  "pydantic": "1.10.15", "numpy": "1.26.2", "huggingface-hub": "0.36.2", "Pillow": "9.5.0",
                  "open_clip_torch": "2.20.0"}


@pytest.fixture
def env(monkeypatch):
    """(installed packages, pip commands, install module); pip "installs" into the dict."""
    installed = dict(A1111_PACKAGES)
    commands: list[str] = []
    monkeypatch.syspath_prepend(STUB)
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    import launch

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    def run_pip(command: str, desc: str = None, live: bool = True) -> str:
        commands.append(command)
        args = shlex.split(command)
        constraints = open(args[args.index("-c") + 1]).read()
        for spec in args[1:args.index("-c")]:
            name, _, wanted = spec.partition("==")
            installed[name] = wanted
        commands.append(constraints)
        return ""

    monkeypatch.setattr(launch, "is_installed", lambda name: name in installed)
    monkeypatch.setattr(launch, "run_pip", run_pip)
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [
        SimpleNamespace(metadata={"Name": name}, version=v) for name, v in installed.items()])
    spec = importlib.util.spec_from_file_location("install", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield installed, commands, module
    sys.modules.pop("launch", None)


def test_first_start_installs_what_is_missing_and_the_second_nothing(env):
    installed, commands, install = env
    assert install.main() == ["peft==0.13.2", "diffusers==0.30.3"]
    command, constraints = commands
    assert command.startswith("install peft==0.13.2 diffusers==0.30.3 -c ")
    for name, version in A1111_PACKAGES.items():  # pip may move nothing installed, A1111's or not
        assert f"{install.canonical(name)}=={version}\n" in constraints
    assert "pillow==9.5.0\n" in constraints and "open-clip-torch==2.20.0\n" in constraints
    assert not any(name in command.split(" -c ")[0] for name in install.HOST_PACKAGES)
    assert installed["peft"] == "0.13.2" and installed["diffusers"] == "0.30.3"
    assert not os.path.exists(command.split('-c "')[1].rstrip('"'))  # constraints file removed
    assert install.main() == [] and len(commands) == 2  # second start: no pip at all


def test_a_wrong_version_is_replaced_and_a_host_package_is_never_installed(env):
    installed, commands, install = env
    installed.update({"peft": "0.14.0", "diffusers": "0.30.3"})
    assert install.main() == ["peft==0.13.2"]
    constraints = commands[1]
    assert "diffusers==0.30.3\n" in constraints and "peft==" not in constraints  # the one replaced is free
    del installed["transformers"]
    installed["peft"] = "0.12.0"
    assert install.main() == [] and len(commands) == 2  # broken host: refuse to touch pip
    assert [name for name, _ in install.requirements()] == ["peft", "diffusers"]
