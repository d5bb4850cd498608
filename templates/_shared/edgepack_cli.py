"""The command line every edgepack bundle's run.py hands over to (the runner core; copied as is, not a template):
`--prompt` streams a reply (`--json`: one document), `--serve ADDR` starts the OpenAI-compatible server.

Standard library only; Python 3.8+.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from edgepack_runner import QUEUE, adapter_names, chat_messages, fit_context, peak_rss_mb, sampling_of
from edgepack_scenarios import SCENARIOS


def main(rt: Any, doc: str) -> int:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", help="the user message (or raw text with --raw)")
    ap.add_argument("--system", help="an optional system message; with --serve, the one clients send: its KV is "
                                     "computed at load (prompt cache)")
    ap.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    ap.add_argument("--max-tokens", type=int, default=rt.max_new_tokens)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--adapter", metavar="NAME", help="answer with the bundle's runtime LoRA adapter NAME "
                                                       "(default: the base model)")
    ap.add_argument("--speculative", choices=getattr(rt, "speculative_modes", ("off",)),
                    help="speculative decoding: ngram (prompt lookup) or off (default: the bundle's, %s)"
                    % getattr(rt, "speculative", "off"))
    ap.add_argument("--threads", type=int, default=rt.threads, help="0 = the runtime's default")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of streaming")
    ap.add_argument("--serve", metavar="ADDR", help="serve the OpenAI-compatible API on HOST:PORT or unix:PATH")
    ap.add_argument("--api-key-file", help="with --serve: require this bearer token (a file holding it; or set "
                                           "EDGEPACK_API_KEY). Needed to bind beyond loopback")
    ap.add_argument("--insecure-no-auth", action="store_true", help="with --serve: allow binding beyond loopback "
                                                                     "without an API key")
    ap.add_argument("--metrics", action="store_true", help="with --serve: GET /metrics in Prometheus text format")
    ap.add_argument("--queue", type=int, default=QUEUE, help="with --serve: requests that may wait for the model")
    ap.add_argument("--prompt-cache-slots", type=int, metavar="N",
                    help="with --serve: conversations whose KV state is kept for their next request (default: the "
                         "bundle's, %d; 0 = none)" % getattr(rt, "prompt_cache_slots", 0))
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), help="play a bench scenario (edgepack_scenarios.py) "
                                                                  "and print its JSON result")
    args = ap.parse_args()
    if args.prompt_cache_slots is not None:
        if args.prompt_cache_slots < 0:
            ap.error("--prompt-cache-slots must be 0 or more")
        rt.prompt_cache_slots = args.prompt_cache_slots
    if args.scenario:
        t0 = time.perf_counter()
        rt.load(args.threads)
        doc = SCENARIOS[args.scenario](rt)
        doc.update(load_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(), bundle=rt.name)
        print(json.dumps(doc))
        return 0
    if args.serve:
        from edgepack_server import serve

        return serve(rt, args)
    if args.prompt is None:
        ap.error("--prompt is required (or use --serve)")
    if args.adapter and args.adapter not in adapter_names(rt):
        sys.stderr.write("error: this bundle has no adapter %r; it has: %s\n" % (
            args.adapter, ", ".join(adapter_names(rt)) or "none (built without --runtime-adapter)"))
        return 1
    t0 = time.perf_counter()
    rt.load(args.threads)
    load_s = time.perf_counter() - t0
    try:
        prepared, n_prompt = rt.prepare(None if args.raw else chat_messages(args.prompt, args.system),
                                        args.prompt if args.raw else None)
        fit_context(rt.context_length, n_prompt, args.max_tokens)
    except ValueError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 1

    def echo(piece: str) -> None:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    extra = {"adapter": args.adapter} if args.adapter else {}
    if args.speculative:
        extra["speculative"] = args.speculative
    out = rt.generate(prepared, n_prompt, args.max_tokens, sampling_of(args), echo, **extra)
    out.update(load_s=round(load_s, 3), peak_rss_mb=peak_rss_mb(), bundle=rt.name, adapter=args.adapter)
    if out.get("stopped") == "context_length":
        sys.stderr.write("[stopped at the bundle's context of %d tokens]\n" % rt.context_length)
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        sys.stderr.write("[%s tokens, prefill %s ms, %s tok/s, peak RSS %s MB]\n" % (
            out["new_tokens"], out["prefill_ms"], out["decode_tokens_per_s"], out["peak_rss_mb"]))
    return 0
