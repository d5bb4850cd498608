"""Where shipped data lives: targets/, templates/ and edgepack/data, in a wheel or a source checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """`targets` or `templates`: inside the wheel (edgepack/_shipped) or at the checkout's top level."""
    for candidate in (_PKG / "_shipped" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"edgepack's shipped '{name}' folder is missing (broken install?)")


def data_file(name: str) -> Path:
    return _PKG / "data" / name


def cache_root() -> Path:
    """EDGEPACK_CACHE, else $XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack."""
    import os

    env = os.environ.get("EDGEPACK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgepack"
