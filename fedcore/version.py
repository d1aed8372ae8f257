"""The installed fedgate version, one source for the CLI and the servers' metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version of the installed ``fedgate`` distribution (pyproject.toml's)."""
    try:
        return version("fedgate")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
