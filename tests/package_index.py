"""A real package index on 127.0.0.1 (PEP 503 simple pages over http.server) and small wheels to put in it, for
tests of what pip accepts from an index: a mirror that serves other bytes under a pinned file name."""

from __future__ import annotations

import base64
import hashlib
import html
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, body: str) -> Path:
    """A pure-Python wheel `name`-`version` holding one module `name` whose source is `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": body.encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgepack-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},"
                     f"{len(b)}\n" for p, b in files.items()) + f"{dist}/RECORD,,\n"
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for p, b in {**files, f"{dist}/RECORD": record.encode()}.items():
            z.writestr(zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0)), b)
    return whl


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(root: Path, *wheels: Path) -> None:
    """Put `wheels` in the index at `root` (replacing files of the same name), each linked with its sha256 as PyPI
    does: a hostile mirror publishes the hash of what it serves."""
    for whl in wheels:
        project = whl.name.split("-")[0].replace("_", "-").lower()
        files = root / "files"
        files.mkdir(parents=True, exist_ok=True)
        (files / whl.name).write_bytes(whl.read_bytes())
        page = root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        same = sorted(files.glob(f"{whl.name.split('-')[0]}-*.whl"))
        links = "".join(f'<a href="../../files/{html.escape(f.name)}#sha256={_sha(f)}">{html.escape(f.name)}</a>\n'
                        for f in same)
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        self.server.served.append(self.path)  # type: ignore[attr-defined]


@contextmanager
def package_index(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `root` on 127.0.0.1; yields (the simple index URL, the request paths served so far)."""
    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    server.served = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/", server.served  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
