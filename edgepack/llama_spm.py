"""llama.cpp's SentencePiece tokenization of plain text, ported: the reference a GGUF's converted tokenizer is
checked against (edgepack/gguf.py). Sources read: ggml-org/llama.cpp src/llama-vocab.cpp — llm_tokenizer_spm_session
(bigram queue ordered by llm_bigram_spm::comparator: higher score first, then lower left index; resegment; byte
fallback), tokenizer_st_partition (user-defined tokens cut out of the raw text before any merge; control and
unknown ones only when parse_special), llama_vocab::impl::tokenize's LLAMA_VOCAB_TYPE_SPM case (" " prepended when
add_space_prefix and the text starts or follows a token; spaces escaped as "▁"), and the special-token cache
(attributes CONTROL | USER_DEFINED | UNKNOWN, sorted by text size, longest first)."""

from __future__ import annotations

import heapq
from typing import Any

USER_DEFINED = 4  # tokenizer.ggml.token_type of a user-defined token (llama.cpp's LLAMA_TOKEN_TYPE_USER_DEFINED)


def _partition(text: str, meta: dict[str, Any]) -> list[str | int]:
    """llama.cpp's tokenizer_st_partition without parse_special: every USER_DEFINED token (type 4) is cut out of
    the raw text first, longest text first, each at all its occurrences left to right (llama-vocab.cpp,
    cache_special_tokens sorted by text size, then tokenizer_st_partition)."""
    tokens, types = meta["tokens"], meta.get("token_type") or ()
    user = sorted((i for i, t in enumerate(types) if t == USER_DEFINED and tokens[i]),
                  key=lambda i: -len(tokens[i].encode("utf-8")))
    fragments: list[str | int] = [text] if text else []
    for i in user:
        out: list[str | int] = []
        for frag in fragments:
            if isinstance(frag, int) or tokens[i] not in frag:
                out.append(frag)
                continue
            parts = frag.split(tokens[i])
            for k, part in enumerate(parts):
                if k:
                    out.append(i)
                if part:
                    out.append(part)
        fragments = out
    return fragments


def _spm_session(text: str, vocab: dict[str, int], scores: list[float], unk: int) -> list[int]:
    """llm_tokenizer_spm_session::tokenize: adjacent symbols whose concatenation is a token merge, highest score
    first, leftmost on ties; what is left that is no token goes out as <0xNN> byte tokens."""
    syms = list(text)
    prev, nxt = list(range(-1, len(syms) - 1)), [*range(1, len(syms)), -1]
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        j = vocab.get(syms[left] + syms[right])
        if j is not None:
            heapq.heappush(heap, (-scores[j], left, right, len(syms[left]) + len(syms[right])))

    for i in range(1, len(syms)):
        push(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue  # one side was merged since this pair was queued
        syms[left], syms[right] = syms[left] + syms[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    ids: list[int] = []
    i = 0 if syms else -1
    while i >= 0:
        j = vocab.get(syms[i])
        if j is not None:
            ids.append(j)
        else:  # resegment(): a symbol no merge produced, i.e. one character outside the vocabulary
            ids.extend(vocab.get(f"<0x{b:02X}>", vocab.get(chr(b), unk) if b < 0x80 else unk)
                       for b in syms[i].encode("utf-8"))
        i = nxt[i]
    return ids


def spm_encode(text: str, meta: dict[str, Any]) -> list[int]:
    """llama.cpp's SentencePiece tokenization of plain text (llama_vocab::impl::tokenize, LLAMA_VOCAB_TYPE_SPM,
    parse_special false): user-defined tokens cut out whole, then each piece of text between them — with " "
    prepended when add_space_prefix and it starts the text or follows a token, spaces as "▁" — merged by
    llm_tokenizer_spm_session. Token texts are looked up exactly as the file spells them, as llama.cpp does."""
    tokens: list[str] = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated text maps to its last id, as token_to_id does
    scores = meta.get("scores") or [0.0] * len(tokens)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    ids: list[int] = []
    after_token = True
    for frag in _partition(text, meta):
        if isinstance(frag, int):
            ids.append(frag)
            after_token = True
            continue
        ids += _spm_session((" " + frag if prefix and after_token else frag).replace(" ", "▁"), vocab, scores, unk)
        after_token = False
    return ids
