"""Stand-in for A1111's launch.py as an extension's install.py sees it: ``is_installed`` and
``run_pip`` (which here records the command instead of running pip)."""
import importlib.metadata
import importlib.util

pip_commands: list[tuple[str, str]] = []


def is_installed(package: str) -> bool:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command: str, desc: str = None, live: bool = True) -> str:
    pip_commands.append((command, desc))
    return ""
