"""Fixtures of the checkpoint registry tests: an HTTP server on 127.0.0.1 serving small files, and
a registry (``MIAS_SAM_WEIGHTS_REGISTRY``) whose entries point at it with known hashes."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial

import pytest

PAYLOAD = b"MIAS-SAM test checkpoint\n" * 4096  # 100 KiB


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base URL, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "tiny.pth").write_bytes(PAYLOAD)
    (www / "corrupt.pth").write_bytes(PAYLOAD[:-10] + b"0123456789")  # same size, other bytes
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet; remember the paths asked for
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def test_registry(tmp_path, server, monkeypatch):
    """A registry with the served files: one with the right SHA-256, one whose bytes do not match,
    one checked by MD5; and a private cache folder."""
    base, _ = server
    reg = {
        "test-ok": {"variant": "vit_b", "filename": "tiny.pth", "url": f"{base}/tiny.pth",
                    "hash": "sha256:" + hashlib.sha256(PAYLOAD).hexdigest(), "title": "test weights"},
        "test-corrupt": {"variant": "vit_b", "filename": "corrupt.pth", "url": f"{base}/corrupt.pth",
                         "hash": "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()},
        "test-md5": {"variant": "vit_l", "filename": "tiny-md5.pth", "url": f"{base}/tiny.pth",
                     "hash": "md5:" + hashlib.md5(PAYLOAD).hexdigest()},
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(reg))
    monkeypatch.setenv("MIAS_SAM_WEIGHTS_REGISTRY", str(path))
    monkeypatch.setenv("MIAS_SAM_CACHE", str(tmp_path / "cache"))
    return reg
