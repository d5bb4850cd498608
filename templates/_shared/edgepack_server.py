"""The OpenAI-compatible HTTP server of the runner core every edgepack bundle ships (copied as is, not a template):
POST /v1/chat/completions (SSE streaming), POST /v1/completions, GET /v1/models, GET /health, GET /metrics, on TCP or
a unix socket, one generation at a time behind a bounded queue (docs/serve.md). Started by `run.py --serve ADDR`.

Hostile clients: one thread reads every connection without blocking, under one deadline for the whole request, and
answers /health itself; a fixed pool of threads handles only requests that have fully arrived. So a client that
trickles bytes holds a buffer, never a thread (docs/serve.md, "Under hostile clients").

Standard library only; Python 3.8+.
"""
from __future__ import annotations

import collections
import errno
import hmac
import ipaddress
import json
import os
import queue as queues
import re
import select
import selectors
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.client import HTTPException, parse_headers
from http.server import BaseHTTPRequestHandler
from io import BytesIO
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from edgepack_runner import GREEDY, ContextError, adapter_names, fit_context

MAX_BODY = 1 << 20  # bytes of request body
MAX_HEAD = 64 << 10  # bytes of request line and headers
MAX_DEPTH = 64  # nesting of a request's JSON (OpenAI's requests nest about 5 deep)
REQUEST_DEADLINE_S = 20.0  # request line, headers and body arrive within this in all, however slowly they trickle
SEND_TIMEOUT_S = 20.0  # a write to a client that stopped reading fails after this
LINGER_S = 2.0  # after the last answer, unread input is drained this long, so closing does not reset the answer
WORKERS = 16  # threads that handle complete requests: the only threads besides the reader and the model loader
READY = 64  # complete requests waiting for a worker; more get 503 + Retry-After at once
PENDING = 512  # connections still sending a request; past this the one that started longest ago is dropped
BUFFERED = 16 << 20  # bytes of requests still arriving, all connections together; past it the oldest is dropped
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Stop(Exception):
    """Raised from the text callback to end a generation early at a stop string."""


class _Gone(Exception):
    """The client hung up: the work for it stops, and nothing more is sent."""


# -- the server ------------------------------------------------------------------------------------------

class Metrics:
    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Dict[tuple, int] = {}
        self.models: Dict[str, int] = {}  # completion requests by the model id they selected (base or adapter)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = [0] * (len(self.BUCKETS) + 1)
        self.arena_max = 0  # the malloc arena cap applied at start (0: none), what keeps memory flat under load
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.accept_backoffs = 0

    def request(self, path: str, status: int) -> None:
        path = path if path in ROUTES else "other"  # a client's path is not a label: bounded, no quoting
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def model(self, name: str) -> None:
        # Only ids this server serves get here (Request refuses the rest), so the label set stays bounded.
        with self.lock:
            self.models[name] = self.models.get(name, 0) + 1

    def generated(self, prompt: int, completion: int, ttft_s: Optional[float]) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if ttft_s is not None:
                self.ttft_sum += ttft_s
                self.ttft_count += 1
                for i, b in enumerate(self.BUCKETS):
                    if ttft_s <= b:
                        self.ttft[i] += 1
                self.ttft[-1] += 1

    def text(self, queue_depth: int, busy: bool, cache: Optional[Dict[str, int]] = None) -> str:
        with self.lock:
            lines = ["# TYPE edgepack_requests_total counter"]
            lines += ['edgepack_requests_total{path="%s",status="%d"} %d' % (p, s, n)
                      for (p, s), n in sorted(self.requests.items())]
            lines += ["# TYPE edgepack_model_requests_total counter"]
            lines += ['edgepack_model_requests_total{model="%s"} %d' % (_label(m), n)
                      for m, n in sorted(self.models.items())]
            lines += ["# TYPE edgepack_prompt_tokens_total counter",
                      "edgepack_prompt_tokens_total %d" % self.prompt_tokens,
                      "# TYPE edgepack_completion_tokens_total counter",
                      "edgepack_completion_tokens_total %d" % self.completion_tokens,
                      "# TYPE edgepack_time_to_first_token_seconds histogram"]
            lines += ['edgepack_time_to_first_token_seconds_bucket{le="%s"} %d' % (b, self.ttft[i])
                      for i, b in enumerate(self.BUCKETS)]
            lines += ['edgepack_time_to_first_token_seconds_bucket{le="+Inf"} %d' % self.ttft[-1],
                      "edgepack_time_to_first_token_seconds_sum %.6f" % self.ttft_sum,
                      "edgepack_time_to_first_token_seconds_count %d" % self.ttft_count,
                      "# TYPE edgepack_queue_depth gauge", "edgepack_queue_depth %d" % queue_depth,
                      "# TYPE edgepack_busy gauge", "edgepack_busy %d" % int(busy),
                      "# TYPE edgepack_accept_backoffs_total counter",
                      "edgepack_accept_backoffs_total %d" % self.accept_backoffs,
                      "# TYPE edgepack_malloc_arena_max gauge", "edgepack_malloc_arena_max %d" % self.arena_max]
            if cache is not None:  # the prompt cache (edgepack_runner.PromptCache): prompt tokens reused vs prefilled
                lines += ["# TYPE edgepack_prompt_tokens_reused_total counter",
                          "edgepack_prompt_tokens_reused_total %d" % cache["reused_tokens"],
                          "# TYPE edgepack_prompt_tokens_prefilled_total counter",
                          "edgepack_prompt_tokens_prefilled_total %d" % cache["prefilled_tokens"],
                          "# TYPE edgepack_prompt_cache_slots gauge",
                          "edgepack_prompt_cache_slots %d" % cache["slots"],
                          "# TYPE edgepack_prompt_cache_kept gauge", "edgepack_prompt_cache_kept %d" % cache["kept"]]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped (an adapter's name is a file name)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Model:
    """The loaded runtime, one generation at a time, and a bounded queue in front of it."""

    def __init__(self, rt: Any, queue: int, system: Optional[str] = None) -> None:
        self.rt = rt
        self.system = system  # the system prompt clients send: its KV is prefilled at load (prompt cache)
        self.idle = threading.Event()  # set after each generation: kept replies are settled while nothing waits
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self.gen_lock = threading.Lock()
        self.cond = threading.Lock()
        self.waiting = 0
        self.queue = max(queue, 0)
        self.busy = False
        self.metrics = Metrics()
        self.last_s = 5.0  # how long the last generation took: the Retry-After estimate

    def load(self, threads: int) -> None:
        try:
            self.rt.load(threads)
            if getattr(self.rt, "warm", None) is not None:
                self.rt.warm(self.system)
        except Exception as exc:  # /health says so; the process stays up to report it
            self.load_error = "%s: %s" % (type(exc).__name__, exc)
        if not self.load_error and getattr(self.rt, "settle", None) is not None:
            threading.Thread(target=self._settle, name="edgepack-settle", daemon=True).start()
        self.ready.set()

    def _settle(self) -> None:
        """While no request waits, prefill the kept replies (Runtime.settle, a chunk at a time) so the next turn
        of each conversation reuses its whole history exactly. A request arriving waits at most one chunk."""
        while True:
            self.idle.wait()
            self.idle.clear()
            while True:
                with self.cond:
                    if self.waiting or self.busy:
                        break
                if not self.gen_lock.acquire(blocking=False):
                    break
                try:
                    more = self.rt.settle()
                except Exception:  # a slot that cannot settle is prefilled by its next request instead
                    more = False
                finally:
                    self.gen_lock.release()
                if not more:
                    break

    def run(self, fn: Callable[[], Any]) -> Any:
        with self.cond:
            if self.busy and self.waiting >= self.queue:
                raise ApiError(429, "the model is busy and %d requests are waiting; retry later" % self.waiting,
                               kind="rate_limit_error", code="queue_full",
                               retry_after=max(1, int(self.last_s * (self.waiting + 1) + 0.5)))
            self.waiting += 1
        with self.gen_lock:
            with self.cond:
                self.waiting -= 1
                self.busy = True
            t0 = time.monotonic()
            try:
                return fn()
            finally:
                self.last_s = time.monotonic() - t0
                with self.cond:
                    self.busy = False
                self.idle.set()


def _content(msg: Any, i: int) -> Dict[str, str]:
    if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "developer"):
        raise ApiError(400, "messages[%d] must be an object with role system, user or assistant" % i,
                       param="messages")
    content = msg.get("content")
    if isinstance(content, list):  # content parts: only text
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "messages[%d].content: only text parts are supported" % i, param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, "messages[%d].content must be a string" % i, param="messages")
    role = "system" if msg["role"] == "developer" else msg["role"]
    return {"role": role, "content": content}


def _int(body: Dict[str, Any], key: str, default: Optional[int], low: int, high: int) -> Optional[int]:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ApiError(400, "%s must be an integer from %d to %d (got %r)" % (key, low, high, v), param=key)
    return v


def _float(body: Dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ApiError(400, "%s must be a number from %s to %s (got %r)" % (key, low, high, v), param=key)
    return float(v)


def select_model(rt: Any, want: Any) -> Tuple[str, Optional[str]]:
    """(the model id served, the runtime adapter to pass as `adapter=` or None) for a request's `model`.

    Absent, empty or the bundle's name: the base. An adapter's name: that adapter, on the same loaded base (nothing
    is reloaded). Anything else is a 404 (model_not_found) when the bundle carries adapters: serving the base to a
    mistyped adapter name would look like the fine-tune answering. A bundle without adapters serves one model and
    keeps ignoring `model`, as it always has: clients send whatever their SDK requires ("gpt-4o", "any")."""
    if want is None or want == "" or want == rt.name:
        return rt.name, None
    names = adapter_names(rt)
    if not names:
        return rt.name, None
    if isinstance(want, str) and want in names:
        return want, want
    shown = want if isinstance(want, str) else json.dumps(want)
    if len(shown) > 200:  # the body may be 1 MiB; the error need not echo all of it
        shown = shown[:200] + "..."
    raise ApiError(404, "The model '%s' does not exist; this server has: %s" % (shown, ", ".join([rt.name] + names)),
                   param="model", code="model_not_found")


class Request:
    """A validated completion request."""

    def __init__(self, body: Any, chat: bool, rt: Any) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.model, self.adapter = select_model(rt, body.get("model"))
        self.chat = chat
        self.stream = bool(body.get("stream", False))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False
        if _int(body, "n", 1, 1, 1) != 1:
            raise ApiError(400, "n must be 1", param="n")
        limit = rt.context_length or 1 << 20
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        self.max_tokens = _int(body, key, rt.max_new_tokens, 1, limit) or rt.max_new_tokens
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
        seed = _int(body, "seed", None, -(1 << 63), (1 << 63) - 1)
        # Greedy unless the client asks for a temperature above 0: a device's replies are reproducible by default.
        self.sampling = GREEDY if temperature == 0.0 or "temperature" not in body else {
            "sample": True, "temperature": temperature, "top_p": top_p, "top_k": 50, "seed": seed}
        self.speculative = body.get("speculative")  # an edgepack extension: "ngram" or "off" (default: the bundle's)
        modes = getattr(rt, "speculative_modes", ("off",))
        if self.speculative is not None and self.speculative not in modes:
            raise ApiError(400, "speculative must be one of: %s" % ", ".join(modes), param="speculative")
        stop = body.get("stop")
        if stop is None:
            self.stop: List[str] = []
        elif isinstance(stop, str):
            self.stop = [stop] if stop else []
        elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
            self.stop = list(stop)
        else:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            self.messages: Optional[List[Dict[str, str]]] = [_content(m, i) for i, m in enumerate(msgs)]
            self.text: Optional[str] = None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
            self.messages, self.text = None, prompt


def fit_messages(rt: Any, messages: List[Dict[str, str]], gone: Optional[Callable[[], bool]] = None) -> tuple:
    """Prepare a chat within the bundle's context: the oldest turns after the system prompt are dropped, the last
    user turn is always kept; if it alone does not fit, a 400 (context_length_exceeded).

    The whole chat is tokenized once. When it does not fit, the most recent turns that fit are found by trying the
    last 1, 2, 4, ... turns and then bisecting, so each try tokenizes at most about twice what the context holds and
    there are about 2 log2(turns) tries: a chat of thousands of turns costs what its newest context's worth does,
    not a re-tokenization per dropped turn. `gone()` true (the client hung up) stops the work between tries."""
    msgs = list(messages)
    prepared, n = rt.prepare(msgs, None)
    limit = rt.context_length
    if not limit or n is None or n < limit:
        return prepared, n, 0
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    turns = msgs[len(head):]
    if len(turns) <= 1:
        raise ApiError(400, "the last message alone is %d tokens; this bundle's context holds %d (prompt + reply)"
                       % (n, limit), param="messages", code="context_length_exceeded")

    def keep(k: int) -> Tuple[Any, Any]:
        if gone is not None and gone():
            raise _Gone()
        return rt.prepare(head + turns[len(turns) - k:], None)

    best = keep(1)
    if best[1] is not None and best[1] >= limit:
        raise ApiError(400, "the last message alone is %d tokens; this bundle's context holds %d (prompt + reply)"
                       % (best[1], limit), param="messages", code="context_length_exceeded")
    fits, over = 1, len(turns)  # keeping `fits` turns fits, keeping `over` does not
    k = 2
    while k < over:
        tried = keep(k)
        if tried[1] is not None and tried[1] >= limit:
            over = k
            break
        fits, best, k = k, tried, k * 2
    while over - fits > 1:
        mid = (fits + over) // 2
        tried = keep(mid)
        if tried[1] is not None and tried[1] >= limit:
            over = mid
        else:
            fits, best = mid, tried
    return best[0], best[1], len(turns) - fits


_DIGITS = re.compile(r"[0-9]{1,64}\Z")


def content_length(headers: Any) -> int:
    """The body's length as the headers declare it, at most MAX_BODY; an ApiError before any body byte is read."""
    if headers.get("Transfer-Encoding") is not None:
        raise ApiError(411, "send the body with a Content-Length (Transfer-Encoding bodies are not read)")
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        raise ApiError(411, "a Content-Length header (a non-negative integer) is required")
    if len(set(values)) != 1 or not _DIGITS.match(values[0]):
        raise ApiError(400, "Content-Length must be one non-negative integer (got %s)"
                       % ", ".join(repr(v[:40]) for v in values[:4]))
    n = int(values[0])
    if n > MAX_BODY:
        raise ApiError(413, "the body is %d bytes; at most %d are read" % (n, MAX_BODY), code="body_too_large")
    return n


def authorized(headers: Any, key: Optional[str]) -> bool:
    if key is None:
        return True
    got = headers.get("Authorization", "")
    return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode())


def parse_body(raw: bytes) -> Any:
    """The JSON of a request body; a 400 for bytes that are not UTF-8, text that is not JSON, nesting deeper than
    MAX_DEPTH and strings that cannot be encoded (lone surrogates such as "\\ud800", which tokenizers refuse)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "the body is not UTF-8 (bad byte at offset %d)" % exc.start) from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ApiError(400, "the body nests deeper than %d levels" % MAX_DEPTH) from None
    except ValueError as exc:
        raise ApiError(400, "the body is not valid JSON: %s" % exc) from None
    todo = [(doc, 0)]
    while todo:  # iterative: a deep document must not need a deep stack to be refused
        value, depth = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(400, "the body holds a lone surrogate (%r), which is not text" % value[exc.start]) \
                    from None
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ApiError(400, "the body nests deeper than %d levels" % MAX_DEPTH)
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for k, v in items:
                if k is not None:
                    todo.append((k, depth))
                todo.append((v, depth + 1))
    return doc


def health(model: Model) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
    if not model.ready.is_set():
        return 503, {"status": "loading"}, {"Retry-After": "1"}
    if model.load_error:
        return 500, {"status": "error", "error": model.load_error}, {}
    return 200, {"status": "ok", "model": model.rt.name, "busy": model.busy, "queue": model.waiting}, {}


def response(status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers the reader sends without a handler."""
    data = (json.dumps(body) + "\n").encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = ["HTTP/1.1 %d %s" % (status, phrase), "Server: edgepack", "Content-Type: application/json",
            "Content-Length: %d" % len(data), "Connection: close"]
    head += ["%s: %s" % kv for kv in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class _Reader:
    """The request's bytes for http.server: what the server already read, then the socket, under the request's
    deadline (one deadline for every read together, not one per read)."""

    def __init__(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        self.sock, self.buf, self.deadline = sock, bytearray(data), deadline

    def _more(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request did not arrive in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        finally:
            self.sock.settimeout(SEND_TIMEOUT_S)
        self.buf += data
        return bool(data)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0 and (limit < 0 or i < limit):
                return self._take(i + 1)
            if 0 <= limit <= len(self.buf) or not self._more():
                return self._take(len(self.buf) if limit < 0 else min(limit, len(self.buf)))

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) < n) and self._more():
            pass
        return self._take(len(self.buf) if n < 0 else min(n, len(self.buf)))

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        return bytes(self.buf)


class _Writer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)  # the socket's timeout bounds the whole call (SEND_TIMEOUT_S)
        return len(data)

    def flush(self) -> None:
        pass


class Handler(BaseHTTPRequestHandler):
    """One complete request, on a worker thread (the server's reader has already received it)."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a reply always has a status line, even to a malformed request line
    server_version = "edgepack"
    model: Model
    api_key: Optional[str] = None
    metrics_on = False
    path = "-"
    _streaming = False

    def setup(self) -> None:
        conn = self.request
        self.connection = conn.sock
        self.rfile = _Reader(conn.sock, bytes(conn.buf), conn.deadline)  # type: ignore[assignment]
        self.wfile = _Writer(conn.sock)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()  # one request: a kept-alive connection goes back to the reader, not a thread

    def finish(self) -> None:
        pass

    def handle_expect_100(self) -> bool:
        return True  # the reader sent "100 Continue" before it waited for the body

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: metrics count requests
        pass

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, status: int, body: Any, ctype: str = "application/json",
              headers: Optional[Dict[str, str]] = None) -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode() if ctype == "application/json" \
            else str(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.model.metrics.request(self.path.split("?")[0], status)

    def _error(self, err: ApiError) -> None:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after else {}
        if err.status >= 400 and err.status != 429:
            headers["Connection"] = "close"
            self.close_connection = True
        self._send(err.status, err.body(), headers=headers)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """What http.server itself refuses (a bad request line or header, an unknown method), in OpenAI's shape."""
        status = int(code)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        self._error(ApiError(status, message or phrase, kind="server_error" if status >= 500 else
                             "invalid_request_error"))

    def _body(self) -> Any:
        n = content_length(self.headers)
        raw = self.rfile.read(n)
        if len(raw) != n:
            raise ApiError(400, "the body ended after %d of %d bytes" % (len(raw), n))
        return parse_body(raw)

    def _authorized(self) -> bool:
        return authorized(self.headers, self.api_key)

    def _client_gone(self) -> bool:
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _failed(self, exc: BaseException) -> None:
        """A bug or an unexpected failure: one line on stderr, and a 500 in OpenAI's shape if nothing was sent."""
        sys.stderr.write("edgepack: request failed: %s: %s\n" % (type(exc).__name__, exc))
        self.close_connection = True
        if not self._streaming:
            try:
                self._error(ApiError(500, "the server failed: %s" % type(exc).__name__, kind="server_error"))
            except OSError:
                pass

    # -- routes -------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:  # GET /health never gets here: the reader answers it (Server._advance)
            if not self._authorized():
                raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                               kind="authentication_error", code="invalid_api_key")
            if path == "/v1/models":
                rt = self.model.rt
                base = {"id": rt.name, "object": "model", "created": 0, "owned_by": "edgepack"}
                # Each runtime adapter is a model of its own to clients, served on the one loaded base (`parent`).
                self._send(200, {"object": "list", "data": [base] + [dict(base, id=name, parent=rt.name)
                                                                      for name in adapter_names(rt)]})
            elif path == "/metrics" and self.metrics_on:
                cache = getattr(self.model.rt, "cache", None)
                self._send(200, self.model.metrics.text(self.model.waiting, self.model.busy,
                                                        cache.stats() if cache is not None else None),
                           ctype="text/plain; version=0.0.4")
            else:
                raise ApiError(404, "no route %s" % path, code="not_found")
        except ApiError as err:
            self._error(err)
        except OSError:
            self.close_connection = True
        except Exception as exc:
            self._failed(exc)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, "no route %s" % path, code="not_found")
            if not self._authorized():  # before the body: a stranger's body is never read
                raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                               kind="authentication_error", code="invalid_api_key")
            body = self._body()
            m = self.model
            if not m.ready.is_set():
                raise ApiError(503, "the model is loading", kind="server_error", code="loading", retry_after=1)
            if m.load_error:
                raise ApiError(500, "the model did not load: %s" % m.load_error, kind="server_error")
            req = Request(body, path == "/v1/chat/completions", m.rt)
            m.metrics.model(req.model)
            m.run(lambda: self._complete(req))
        except ApiError as err:
            if self._streaming:
                self.close_connection = True
            else:
                self._error(err)
        except _Gone:
            self.close_connection = True
            self.model.metrics.request(path, 499)  # nginx's "client closed request"
        except OSError:
            self.close_connection = True
        except Exception as exc:
            self._failed(exc)

    def _complete(self, req: Request) -> None:
        rt = self.model.rt
        if self._client_gone():  # hung up while it waited for the model
            raise _Gone()
        if req.chat:
            prepared, n_prompt, _dropped = fit_messages(rt, req.messages or [], self._client_gone)
        else:
            prepared, n_prompt = rt.prepare(None, req.text)
        try:
            max_new = fit_context(rt.context_length, n_prompt, req.max_tokens)
        except ContextError as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if req.chat else "text_completion"
        state = {"text": "", "sent": 0, "stop": False, "first": None, "n": 0}
        hold = max((len(s) for s in req.stop), default=1) - 1
        t0 = time.monotonic()
        if req.stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._streaming = True
            if req.chat:
                self._event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})

        def emit(upto: int) -> None:
            piece = state["text"][state["sent"]:upto]
            state["sent"] = upto
            if piece and req.stream:
                choice = {"index": 0, "delta": {"content": piece}} if req.chat else {"index": 0, "text": piece}
                choice["finish_reason"] = None
                self._event({"id": cid, "object": obj + ".chunk" if req.chat else obj, "created": created,
                             "model": req.model, "choices": [choice]})

        def on_text(piece: str) -> None:
            if state["first"] is None:
                state["first"] = time.monotonic() - t0
            state["n"] += 1
            state["text"] += piece
            for s in req.stop:
                i = state["text"].find(s)
                if i >= 0:
                    state["text"] = state["text"][:i]
                    state["stop"] = True
                    emit(i)
                    raise _Stop()
            emit(max(state["sent"], len(state["text"]) - hold))
            if not req.stream and state["n"] % 8 == 0 and self._client_gone():
                raise _Gone()

        try:
            # adapter= and speculative= only when asked for: LiteRT runtimes' generate takes neither.
            extra = {"adapter": req.adapter} if req.adapter else {}
            if req.speculative:
                extra["speculative"] = req.speculative
            out = rt.generate(prepared, n_prompt, max_new, req.sampling, on_text, **extra)
            new_tokens, stopped = out["new_tokens"], out.get("stopped")
        except _Stop:
            new_tokens, stopped = state["n"], "stop_string"
        except _Gone:
            self.model.metrics.generated(n_prompt or 0, state["n"], state["first"])
            raise
        except Exception as exc:  # a runtime failure: 500, and the server goes on
            if req.stream:
                self._event({"error": {"message": "%s: %s" % (type(exc).__name__, exc), "type": "server_error"}})
                return
            raise ApiError(500, "the runtime failed: %s: %s" % (type(exc).__name__, exc), kind="server_error")
        finish = "stop" if stopped in ("eos", "stop_string") else "length"
        usage = {"prompt_tokens": n_prompt or 0, "completion_tokens": new_tokens,
                 "total_tokens": (n_prompt or 0) + new_tokens}
        self.model.metrics.generated(n_prompt or 0, new_tokens, state["first"])
        if req.stream:
            emit(len(state["text"]))
            final = {"index": 0, "delta": {}, "finish_reason": finish} if req.chat else \
                {"index": 0, "text": "", "finish_reason": finish}
            self._event({"id": cid, "object": obj + ".chunk" if req.chat else obj, "created": created,
                         "model": req.model, "choices": [final]})
            if req.include_usage:
                self._event({"id": cid, "object": obj + ".chunk" if req.chat else obj, "created": created,
                             "model": req.model, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.model.metrics.request(self.path, 200)
            return
        choice = {"index": 0, "message": {"role": "assistant", "content": state["text"]}, "finish_reason": finish} \
            if req.chat else {"index": 0, "text": state["text"], "finish_reason": finish, "logprobs": None}
        self._send(200, {"id": cid, "object": obj, "created": created, "model": req.model, "choices": [choice],
                         "usage": usage})

    def _event(self, data: Dict[str, Any]) -> None:
        try:
            self.wfile.write(("data: %s\n\n" % json.dumps(data)).encode())
        except OSError:  # hung up, or stopped reading for SEND_TIMEOUT_S: the generation ends here
            raise _Gone() from None


class _Conn:
    """A connection the reader holds: what has arrived of its current request, and when the rest is due."""

    __slots__ = ("sock", "addr", "buf", "deadline", "head", "need", "scanned")

    def __init__(self, sock: socket.socket, addr: Any, data: bytes, deadline: float) -> None:
        self.sock, self.addr, self.buf, self.deadline = sock, addr, bytearray(data), deadline
        self.head = 0  # where the headers end, once they have
        self.need = -1  # bytes of the whole request (head + body) once the head is known
        self.scanned = 0  # the head's end was searched for up to here


def _head_end(buf: bytearray, start: int) -> int:
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") for i in (buf.find(sep, start),) if i >= 0]
    return min(ends) if ends else -1


def _head(raw: bytes) -> Tuple[str, str, Any]:
    """Method, path and headers of a complete head; ValueError or HTTPException where the handler will refuse it."""
    line, _, rest = raw.partition(b"\n")
    words = line.decode("latin-1").split()
    if len(words) != 3:
        raise ValueError(line)
    return words[0], words[1].split("?")[0], parse_headers(BytesIO(rest))


class Server:
    """The reader (serve_forever, one thread) and a fixed pool of workers.

    The reader accepts connections and reads every one without blocking until its request has fully arrived (the
    head and, for an authorized POST with a valid Content-Length, the body), under one deadline for the whole
    request; it answers /health and the refusals itself (408 late, 431 head too large, 400 cut short, 503 full) and
    queues complete requests for the workers. A worker hands a kept-alive connection back to the reader. At the
    file descriptor limit the reader stops accepting for a growing pause (0.05 s doubling to 1 s) and drops the
    connection that has waited longest for its request, instead of spinning on accept."""

    def __init__(self, listener: socket.socket, handler: Any, workers: int = WORKERS,
                 deadline_s: float = REQUEST_DEADLINE_S) -> None:
        self.listener, self.handler, self.deadline_s = listener, handler, deadline_s
        self.metrics: Metrics = handler.model.metrics
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.pending: Dict[socket.socket, _Conn] = {}  # requests arriving, oldest first
        self.closing: Dict[socket.socket, _Conn] = {}  # answered; unread input drained until EOF or LINGER_S
        self.buffered = 0
        self.ready: queues.Queue = queues.Queue(READY)
        self.back: Deque[Tuple[_Conn, bool]] = collections.deque()  # from workers: (conn, keep alive)
        self.stopped = threading.Event()
        self.paused_until = 0.0
        self.streak = 0
        self.workers = [threading.Thread(target=self._work, name="edgepack-worker-%d" % i, daemon=True)
                        for i in range(workers)]
        for t in self.workers:
            t.start()

    # -- the reader ----------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        while not self.stopped.is_set():
            wait = min(0.25, max(0.0, self.paused_until - time.monotonic())) if self.paused_until else 0.25
            for key, _ in self.sel.select(wait):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                else:
                    self._read(key.data)
            while self.back:
                conn, keep = self.back.popleft()
                conn.sock.setblocking(False)
                if keep:
                    self._watch(conn)
                else:
                    self._linger(conn)
            now = time.monotonic()
            if self.paused_until and now >= self.paused_until:
                self.paused_until = 0.0
                self.sel.register(self.listener, selectors.EVENT_READ, "accept")
            for table, late in ((self.pending, True), (self.closing, False)):
                while table:
                    conn = next(iter(table.values()))
                    if conn.deadline > now:
                        break
                    if late and conn.buf:
                        self._answer(conn, 408, "the request did not arrive within %g s" % self.deadline_s,
                                     code="request_timeout")
                    else:
                        self._drop(conn)

    def shutdown(self) -> None:
        self.stopped.set()
        self._wake()

    def close(self) -> None:
        self.stopped.set()
        for conn in list(self.pending.values()) + list(self.closing.values()):
            self._drop(conn)
        self.sel.close()
        for s in (self.listener, self._wake_r, self._wake_w):
            s.close()

    def _accept(self) -> None:
        for _ in range(64):  # then the other connections get a turn
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                self._out_of_fds()  # EMFILE, ENFILE, ENOBUFS: retrying at once would spin
                return
            self.streak = 0
            sock.setblocking(False)
            if len(self.pending) >= PENDING:
                self._answer(next(iter(self.pending.values())), 503, "too many connections", code="overloaded",
                             retry_after=1, linger=False)
            self._watch(_Conn(sock, addr, b"", 0.0))

    def _out_of_fds(self) -> None:
        with self.metrics.lock:
            self.metrics.accept_backoffs += 1
        self.sel.unregister(self.listener)
        self.paused_until = time.monotonic() + min(1.0, 0.05 * 2 ** self.streak)
        self.streak = min(self.streak + 1, 5)
        victims = self.closing or self.pending  # a descriptor for the next client: the longest-waiting one's
        if victims:
            self._drop(next(iter(victims.values())))

    def _watch(self, conn: _Conn) -> None:
        """Read this connection's next request, due within the deadline."""
        conn.deadline = time.monotonic() + self.deadline_s
        conn.head, conn.need, conn.scanned = 0, -1, 0
        self.pending[conn.sock] = conn
        self.buffered += len(conn.buf)
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.buf:
            self._advance(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if conn.sock in self.closing:
            if not data:
                self._drop(conn)
            return
        if not data:
            if conn.need >= 0:
                self._answer(conn, 400, "the body ended after %d of %d bytes" % (len(conn.buf) - conn.head,
                                                                                 conn.need - conn.head))
            elif conn.buf:
                self._answer(conn, 400, "the request ended inside its headers")
            else:
                self._drop(conn)
            return
        conn.buf += data
        self.buffered += len(data)
        self._advance(conn)
        while self.buffered > BUFFERED and self.pending:
            self._answer(next(iter(self.pending.values())), 503, "too many requests are arriving at once",
                         code="overloaded", retry_after=1)

    def _advance(self, conn: _Conn) -> None:
        if conn.need < 0:
            if not conn.scanned:  # blank lines before a request line are ignored (RFC 9112, 2.2)
                n = len(conn.buf) - len(conn.buf.lstrip(b"\r\n"))
                del conn.buf[:n]
                self.buffered -= n
            end = _head_end(conn.buf, max(0, conn.scanned - 3))
            conn.scanned = len(conn.buf)
            if end < 0 or end > MAX_HEAD:
                if end > MAX_HEAD or len(conn.buf) > MAX_HEAD:
                    self._answer(conn, 431, "the request line and headers exceed %d bytes" % MAX_HEAD)
                return
            conn.head = conn.need = end
            try:
                method, path, headers = _head(bytes(conn.buf[:end]))
            except (ValueError, HTTPException):
                method, path, headers = "", "", None  # the handler answers what is wrong with it
            if method == "GET" and path == "/health":
                status, body, extra = health(self.handler.model)
                self._answer(conn, status, body, headers=extra, path="/health")
                return
            if headers is not None and method == "POST" and path in ROUTES and \
                    authorized(headers, self.handler.api_key):  # a stranger's body is not waited for
                try:
                    conn.need = end + content_length(headers)
                except ApiError:
                    pass  # the handler refuses it before reading a body
                if conn.need > len(conn.buf) and headers.get("Expect", "").lower() == "100-continue":
                    self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(conn.buf) >= conn.need:
            self._forget(conn)
            try:
                self.ready.put_nowait(conn)
            except queues.Full:
                self._answer(conn, 503, "the server is busy", code="overloaded", retry_after=1)

    def _answer(self, conn: _Conn, status: int, body: Any, code: Optional[str] = None,
                retry_after: Optional[int] = None, headers: Optional[Dict[str, str]] = None,
                linger: bool = True, path: str = "other") -> None:
        """Answer and close, from the reader: a short JSON reply, sent without waiting."""
        if isinstance(body, str):
            body = ApiError(status, body, kind="server_error" if status >= 500 else "invalid_request_error",
                            code=code).body()
        extra = dict(headers or {})
        if retry_after:
            extra["Retry-After"] = str(retry_after)
        self._send(conn, response(status, body, extra))
        self.metrics.request(path, status)
        if linger:
            self._forget(conn)
            self._linger(conn)
        else:
            self._drop(conn)

    @staticmethod
    def _send(conn: _Conn, data: bytes) -> None:
        try:
            conn.sock.send(data)  # a few hundred bytes into an empty socket buffer: sent whole, or the client is gone
        except OSError:
            pass

    def _linger(self, conn: _Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.buf = bytearray()
        conn.deadline = time.monotonic() + LINGER_S
        self.closing[conn.sock] = conn
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _forget(self, conn: _Conn) -> None:
        if self.pending.pop(conn.sock, None) is not None:
            self.buffered -= len(conn.buf)
        elif self.closing.pop(conn.sock, None) is None:
            return
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.sock.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full: the reader wakes anyway
            pass

    # -- the workers ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopped.is_set():
            try:
                conn = self.ready.get(timeout=0.5)
            except queues.Empty:
                continue
            keep = False
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(SEND_TIMEOUT_S)
                done = self.handler(conn, conn.addr, self)
                keep = not done.close_connection
                conn.buf = bytearray(done.rfile.rest())  # a pipelined next request, if any
            except Exception as exc:  # the handler answers its own errors; this is a bug, and the server goes on
                if not isinstance(exc, OSError):
                    sys.stderr.write("edgepack: request failed: %s: %s\n" % (type(exc).__name__, exc))
            self.back.append((conn, keep))
            self._wake()


def listen_tcp(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) to the first address `host` resolves to."""
    family, kind, proto, _, where = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    except OSError:
        sock.close()
        raise
    return sock


def bind_handler(model: Model, api_key: Optional[str], metrics: bool) -> Any:
    """The Handler class of one server (its model, key and options)."""
    return type("Handler", (Handler,), {"model": model, "api_key": api_key, "metrics_on": metrics})


def cap_malloc_arenas() -> int:
    """glibc gives each thread its own malloc arena and keeps the freed pages of each; with one thread per
    connection, peak memory under load grew 1.50x over one request's (bench/bench_serve_memory.py). Two arenas keep
    it within 1.03-1.09x at the same throughput. EDGEPACK_MALLOC_ARENA_MAX overrides (0: glibc's default); an
    explicit MALLOC_ARENA_MAX wins; other C libraries are left alone. Returns the cap applied (0: none)."""
    want = int(os.environ.get("EDGEPACK_MALLOC_ARENA_MAX", "2") or 0)
    if want <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return 0
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 0
    return want if mallopt(-8, want) == 1 else 0  # M_ARENA_MAX; 1 = accepted


def _loopback(address: str) -> bool:
    """Whether a bound address is a loopback one: decided by the address (a name such as 127.example.com is not)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool((mapped or ip).is_loopback)


def serve(rt: Any, args: Any) -> int:
    key = None
    if args.api_key_file:
        with open(args.api_key_file) as fh:
            key = fh.read().strip()
    elif os.environ.get("EDGEPACK_API_KEY"):
        key = os.environ["EDGEPACK_API_KEY"].strip()
    addr = args.serve
    arenas = cap_malloc_arenas()  # before the model loads and the first thread starts
    model = Model(rt, args.queue, getattr(args, "system", None))
    model.metrics.arena_max = arenas
    handler = bind_handler(model, key or None, bool(args.metrics))
    if addr.startswith("unix:") or addr.startswith("/"):
        path = addr[5:] if addr.startswith("unix:") else addr
        if os.path.exists(path):
            os.remove(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o660)
        where = "unix:" + path
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            listener = listen_tcp(host, int(port))
        except (OSError, ValueError) as exc:
            sys.stderr.write("error: cannot listen on %s: %s\n" % (addr, exc))
            return 2
        bound = listener.getsockname()[0]  # the address the name resolved to, not the name
        if not _loopback(bound) and not key and not args.insecure_no_auth:
            listener.close()
            sys.stderr.write("error: binding %s (%s, beyond loopback) needs an API key: --api-key-file FILE or "
                             "EDGEPACK_API_KEY; or --insecure-no-auth to serve anyone on the network\n"
                             % (host, bound))
            return 2
        where = "http://%s:%d" % (host, listener.getsockname()[1])
    listener.listen(128)  # a burst of clients waits in the backlog instead of being reset
    server = Server(listener, handler)
    sys.stderr.write("edgepack: serving %s on %s (loading the model)\n" % (rt.name, where))
    sys.stderr.flush()
    loader = threading.Thread(target=model.load, args=(args.threads,), daemon=True)
    loader.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
