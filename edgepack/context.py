"""The context a bundle holds (prompt + reply tokens): the most a model's bundles can hold in a format, and the
choice a build or plan makes between --context, the target's runtime.context_length and the model's own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from edgepack.backends.onnx import WINDOW_AS_FULL
from edgepack.errors import UserError
from edgepack.shape import ModelShape

if TYPE_CHECKING:
    from edgepack.targets import TargetProfile

DEFAULT_LITERT_CONTEXT = 1024  # edgepack.backends.tflite.KV_CACHE_LEN


def model_context(s: ModelShape, fmt: str) -> int:
    """The most tokens a bundle of this model holds: its max_position_embeddings, or on ONNX the sliding window of
    a model whose window the builder exports as full attention (backends/onnx.py WINDOW_AS_FULL)."""
    return s.window if fmt == "onnx" and s.window and s.architecture in WINDOW_AS_FULL else s.max_positions


ContextSource = Literal["option", "target", "model", "default"]


@dataclass(frozen=True)
class ContextChoice:
    """The context (prompt + reply tokens) a build or plan uses, where it came from and why: recorded in the
    build's progress, its result and the manifest's runtime.context."""

    tokens: int
    source: ContextSource  # option: --context; target: runtime.context_length; model: the model's own;
    #                        default: LiteRT's KV cache default (neither asked, the model holds more)
    model_context: int  # the most this model's bundles hold in this format
    requested: int  # what was asked: --context, else the target's runtime.context_length (0 = nothing)
    reason: str
    format: str = "onnx"

    def apply(self, target: TargetProfile) -> TargetProfile:
        """`target` with runtime.context_length set to this choice where its exporter would use another length
        (a target's 0 stays 0 when that already means this length: same manifest, same cache keys)."""
        asked = target.runtime.context_length
        would = asked or (self.model_context if self.format == "onnx" else DEFAULT_LITERT_CONTEXT)
        if self.tokens == would:
            return target
        return replace(target, runtime=replace(target.runtime, context_length=self.tokens))

    @property
    def capped(self) -> bool:
        """The target asked for more than the model holds, and the model's own context is used instead."""
        return self.source == "model" and self.requested > self.tokens


def choose_context(config: Mapping[str, Any], target: TargetProfile, option: int = 0,
                   fmt: str | None = None) -> ContextChoice:
    """The context a build of this model for `target` uses: `option` (--context) when given, which may not be
    longer than the model's own; else the target's runtime.context_length, or the model's own when the target's
    is longer (a target is written for a device, not for one model) or is 0."""
    from edgepack.targets import MIN_CONTEXT

    chosen_fmt = fmt or target.export.format
    s = ModelShape.from_config(config)
    own = model_context(s, chosen_fmt)
    what = ("its sliding window, which the ONNX builder exports as full attention" if own != s.max_positions
            else "its max_position_embeddings")
    asked = target.runtime.context_length
    if option < 0:
        raise UserError(f"--context must be 0 (the target's, else the model's own) or a token count, not {option}.",
                        field="context")
    if option:
        if option > own:
            raise UserError(f"--context {option} is longer than this model's context: {own} tokens ({what}).",
                            hint=f"Pass --context {own} or less, or leave --context out to use the target's "
                                 "runtime.context_length (the model's own when that is longer).",
                            field="context", context=option, model_context=own)
        if option < MIN_CONTEXT:
            raise UserError(f"--context {option} is below {MIN_CONTEXT} tokens, the least a bundle needs (the "
                            "gate's prompt and reply, and the device's 128-token check text, must fit).",
                            hint=f"Pass --context {MIN_CONTEXT} or more (at most {own}, the model's own).",
                            field="context", context=option, model_context=own)
        return ContextChoice(option, "option", own, option, f"--context {option}", chosen_fmt)
    if asked > own:
        return ContextChoice(own, "model", own, asked,
                             f"the target's runtime.context_length ({asked}) is longer than this model's own "
                             f"context ({own} tokens: {what}), so the model's own is used", chosen_fmt)
    if asked:
        return ContextChoice(asked, "target", own, asked, f"the target's runtime.context_length ({asked})", chosen_fmt)
    if chosen_fmt == "tflite" and own > DEFAULT_LITERT_CONTEXT:
        return ContextChoice(DEFAULT_LITERT_CONTEXT, "default", own, 0,
                             f"LiteRT's default KV cache ({DEFAULT_LITERT_CONTEXT} tokens; the target's "
                             "runtime.context_length is 0)", chosen_fmt)
    return ContextChoice(own, "model", own, 0,
                         f"this model's own context ({own} tokens: {what}; the target's runtime.context_length is 0)",
                         chosen_fmt)
