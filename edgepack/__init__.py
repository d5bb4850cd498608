"""edgepack: small language models → verified, quantized runtime bundles for edge devices."""

from __future__ import annotations

__version__ = "0.1.0"
