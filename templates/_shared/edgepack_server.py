"""The OpenAI-compatible HTTP server of the runner core every edgepack bundle ships (copied as is, not a template):
POST /v1/chat/completions (SSE streaming), POST /v1/completions, GET /v1/models, GET /health, GET /metrics, on TCP or
a unix socket, one generation at a time behind a bounded queue (docs/serve.md). Started by `run.py --serve ADDR`.

Standard library only; Python 3.8+.
"""
from __future__ import annotations

import hmac
import json
import os
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingUnixStreamServer
from typing import Any, Callable, Dict, List, Optional

from edgepack_runner import GREEDY, ContextError, fit_context

MAX_BODY = 1 << 20  # bytes of request body
HEADER_TIMEOUT_S = 20.0  # a client that sends nothing for this long is dropped (slow clients cannot pin threads)
CONNECTIONS = 64  # open connections served at once; more get 503 + Retry-After at once


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Stop(Exception):
    """Raised from the text callback to end a generation early (stop string, client gone)."""


# -- the server ------------------------------------------------------------------------------------------

class Metrics:
    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Dict[tuple, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = [0] * (len(self.BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

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

    def text(self, queue_depth: int, busy: bool) -> str:
        with self.lock:
            lines = ["# TYPE edgepack_requests_total counter"]
            lines += ['edgepack_requests_total{path="%s",status="%d"} %d' % (p, s, n)
                      for (p, s), n in sorted(self.requests.items())]
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
                      "# TYPE edgepack_busy gauge", "edgepack_busy %d" % int(busy)]
        return "\n".join(lines) + "\n"


class Model:
    """The loaded runtime, one generation at a time, and a bounded queue in front of it."""

    def __init__(self, rt: Any, queue: int) -> None:
        self.rt = rt
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
        except Exception as exc:  # /health says so; the process stays up to report it
            self.load_error = "%s: %s" % (type(exc).__name__, exc)
        self.ready.set()

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


class Request:
    """A validated completion request."""

    def __init__(self, body: Any, chat: bool, rt: Any) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
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


def fit_messages(rt: Any, messages: List[Dict[str, str]]) -> tuple:
    """Prepare a chat within the bundle's context: the oldest turns after the system prompt are dropped, the last
    user turn is always kept; if it alone does not fit, a 400 (context_length_exceeded)."""
    msgs = list(messages)
    dropped = 0
    while True:
        prepared, n = rt.prepare(msgs, None)
        if not rt.context_length or n is None or n < rt.context_length:
            return prepared, n, dropped
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            raise ApiError(400, "the last message alone is %d tokens; this bundle's context holds %d (prompt + reply)"
                           % (n, rt.context_length), param="messages", code="context_length_exceeded")
        del msgs[first]
        dropped += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = HEADER_TIMEOUT_S
    server_version = "edgepack"
    model: Model
    api_key: Optional[str] = None
    metrics_on = False

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

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not read)")
        if length is None or not length.strip().isdigit():
            raise ApiError(400 if length is not None else 411, "a Content-Length header (a non-negative integer) "
                                                               "is required")
        n = int(length)
        if n > MAX_BODY:
            raise ApiError(413, "the body is %d bytes; at most %d are read" % (n, MAX_BODY), code="body_too_large")
        raw = self.rfile.read(n)
        if len(raw) != n:
            raise ApiError(400, "the body ended after %d of %d bytes" % (len(raw), n))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, "the body is not valid JSON: %s" % exc) from None

    def _authorized(self) -> bool:
        if self.api_key is None:
            return True
        got = self.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self.api_key.encode())

    def _client_gone(self) -> bool:
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes -------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            if path == "/health":
                m = self.model
                if not m.ready.is_set():
                    self._send(503, {"status": "loading"}, headers={"Retry-After": "1"})
                elif m.load_error:
                    self._send(500, {"status": "error", "error": m.load_error})
                else:
                    self._send(200, {"status": "ok", "model": m.rt.name, "busy": m.busy, "queue": m.waiting})
                return
            if not self._authorized():
                raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                               kind="authentication_error", code="invalid_api_key")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": self.model.rt.name, "object": "model",
                                                             "created": 0, "owned_by": "edgepack"}]})
            elif path == "/metrics" and self.metrics_on:
                self._send(200, self.model.metrics.text(self.model.waiting, self.model.busy),
                           ctype="text/plain; version=0.0.4")
            else:
                raise ApiError(404, "no route %s" % path, code="not_found")
        except ApiError as err:
            self._error(err)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, "no route %s" % path, code="not_found")
            if not self._authorized():
                raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                               kind="authentication_error", code="invalid_api_key")
            body = self._body()
            m = self.model
            if not m.ready.is_set():
                raise ApiError(503, "the model is loading", kind="server_error", code="loading", retry_after=1)
            if m.load_error:
                raise ApiError(500, "the model did not load: %s" % m.load_error, kind="server_error")
            req = Request(body, path == "/v1/chat/completions", m.rt)
            m.run(lambda: self._complete(req))
        except ApiError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _complete(self, req: Request) -> None:
        rt = self.model.rt
        if req.chat:
            prepared, n_prompt, _dropped = fit_messages(rt, req.messages or [])
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
            if req.chat:
                self._event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": rt.name,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})

        def emit(upto: int) -> None:
            piece = state["text"][state["sent"]:upto]
            state["sent"] = upto
            if piece and req.stream:
                choice = {"index": 0, "delta": {"content": piece}} if req.chat else {"index": 0, "text": piece}
                choice["finish_reason"] = None
                self._event({"id": cid, "object": obj + ".chunk" if req.chat else obj, "created": created,
                             "model": rt.name, "choices": [choice]})

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
                raise _Stop()

        try:
            out = rt.generate(prepared, n_prompt, max_new, req.sampling, on_text)
            new_tokens, stopped = out["new_tokens"], out.get("stopped")
        except _Stop:
            new_tokens, stopped = state["n"], "stop_string"
        except (BrokenPipeError, ConnectionResetError):
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
                         "model": rt.name, "choices": [final]})
            if req.include_usage:
                self._event({"id": cid, "object": obj + ".chunk" if req.chat else obj, "created": created,
                             "model": rt.name, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.model.metrics.request(self.path, 200)
            return
        choice = {"index": 0, "message": {"role": "assistant", "content": state["text"]}, "finish_reason": finish} \
            if req.chat else {"index": 0, "text": state["text"], "finish_reason": finish, "logprobs": None}
        self._send(200, {"id": cid, "object": obj, "created": created, "model": rt.name, "choices": [choice],
                         "usage": usage})

    def _event(self, data: Dict[str, Any]) -> None:
        self.wfile.write(("data: %s\n\n" % json.dumps(data)).encode())
        self.wfile.flush()


class _Bounded:
    """Mixin: at most CONNECTIONS served at once; the next ones get a 503 with Retry-After and are closed."""

    slots = threading.BoundedSemaphore(CONNECTIONS)
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 resets clients that connect in a burst

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
            return
        super().process_request(request, client_address)  # type: ignore[misc]

    def _refuse(self, request: Any) -> None:
        """503 + Retry-After, after reading what the client sent (closing on unread data would be a reset)."""
        try:
            request.settimeout(2.0)
            request.recv(MAX_BODY)
            msg = json.dumps({"error": {"message": "too many connections", "type": "server_error",
                                        "param": None, "code": "overloaded"}}).encode()
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(msg) + msg)
            request.shutdown(socket.SHUT_WR)
            while request.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request is not news; anything else goes to stderr, one line."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout)):
            sys.stderr.write("edgepack: request failed: %s: %s\n" % (type(exc).__name__, exc))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.slots.release()


class TCPServer(_Bounded, ThreadingHTTPServer):
    pass


class UnixServer(_Bounded, ThreadingUnixStreamServer):
    pass


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


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def serve(rt: Any, args: Any) -> int:
    key = None
    if args.api_key_file:
        with open(args.api_key_file) as fh:
            key = fh.read().strip()
    elif os.environ.get("EDGEPACK_API_KEY"):
        key = os.environ["EDGEPACK_API_KEY"].strip()
    addr = args.serve
    cap_malloc_arenas()  # before the model loads and the first thread starts
    Handler.model = Model(rt, args.queue)
    Handler.api_key = key or None
    Handler.metrics_on = bool(args.metrics)
    if addr.startswith("unix:") or addr.startswith("/"):
        path = addr[5:] if addr.startswith("unix:") else addr
        if os.path.exists(path):
            os.remove(path)
        server: Any = UnixServer(path, Handler)
        os.chmod(path, 0o660)
        where = "unix:" + path
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not _loopback(host) and not key and not args.insecure_no_auth:
            sys.stderr.write("error: binding %s (beyond loopback) needs an API key: --api-key-file FILE or "
                             "EDGEPACK_API_KEY; or --insecure-no-auth to serve anyone on the network\n" % host)
            return 2
        server = TCPServer((host, int(port)), Handler)
        where = "http://%s:%d" % (host, server.server_address[1])
    sys.stderr.write("edgepack: serving %s on %s (loading the model)\n" % (rt.name, where))
    sys.stderr.flush()
    loader = threading.Thread(target=Handler.model.load, args=(args.threads,), daemon=True)
    loader.start()
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
