"""Versions of installed distributions, for manifests and pins."""

from __future__ import annotations

from importlib import metadata


def installed_versions(*dists: str) -> dict[str, str]:
    """{dist: version} for those of `dists` that are installed."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
