"""Export formats, registered under the names target profiles use (`export.format`)."""

from __future__ import annotations

from edgepack.backends.base import Exporter
from edgepack.registry import Registry

exporters: Registry[type[Exporter]] = Registry(
    "export format", hint="Set export.format in the target file to one of these.")

# Registration happens on import; the modules import nothing heavy at top level.
from edgepack.backends import onnx as _onnx  # noqa: E402,F401
from edgepack.backends import tflite as _tflite  # noqa: E402,F401
