"""`distill serve INDEX`: a local search page over an index, on the standard library's HTTP server.

Routes:
    /                      the page (`distill/assets/search.html`): a query box, the top
                           images with scores, the query's latency
    /api/search?q=..&k=..  JSON: {query, k, items, encode_ms, search_ms, total_ms,
                           results: [{rank, index, id, score, caption, image}]}
    /api/info              JSON: {items, embed_dim, embedder, model, backend}
    /image/<i>             item i as JPEG: its stored thumbnail, else read from its source

Queries run one at a time (a lock): on a small CPU, parallel queries only make each slower,
and the latency the page shows stays the query's own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from distill.deploy.embedders import Embedder
from distill.deploy.search import query
from distill.deploy.search_index import SearchIndex

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent.parent / "assets" / "search.html"
MAX_K = 100


def make_server(index: SearchIndex, embedder: Embedder, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free port), not yet serving.

    Call `serve_forever()` on it (in a thread, for tests) and `shutdown()` to stop.
    """
    page = PAGE.read_bytes()
    lock = threading.Lock()
    info = {"items": len(index), "embed_dim": index.embed_dim, "embedder": index.embedder,
            "model": index.model, "backend": index.backend}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        server_version = "distill-serve"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, data: dict[str, Any]) -> None:
            self.send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self.send(200, page, "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self.send_json(200, info)
            elif url.path == "/api/search":
                self.search(parse_qs(url.query))
            elif m := re.fullmatch(r"/image/(\d+)", url.path):
                i = int(m.group(1))
                data = index.image_jpeg(i) if i < len(index) else None
                if data is None:
                    self.send_json(404, {"error": f"no image {i}"})
                else:
                    self.send(200, data, "image/jpeg", cache=True)
            else:
                self.send_json(404, {"error": f"no such page: {url.path}"})

        def search(self, params: dict[str, list[str]]) -> None:
            text = params.get("q", [""])[0].strip()
            if not text:
                self.send_json(400, {"error": "empty query: pass ?q=some words"})
                return
            try:
                k = int(params.get("k", ["10"])[0])
            except ValueError:
                self.send_json(400, {"error": "k must be an integer"})
                return
            if not 1 <= k <= MAX_K:
                self.send_json(400, {"error": f"k must be between 1 and {MAX_K}"})
                return
            with lock:
                results = query(index, embedder, text, k)
            rows = results.rows(index)
            for row in rows:
                row["image"] = f"/image/{row['index']}"
            self.send_json(200, {
                "query": text, "k": k, "items": len(index), "encode_ms": results.encode_ms,
                "search_ms": results.search_ms, "total_ms": results.total_ms, "results": rows,
            })  # fmt: skip

    return ThreadingHTTPServer((host, port), Handler)


def serve(index: SearchIndex, embedder: Embedder, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C), printing the address first."""
    query(index, embedder, "warm up", 1)  # the first call of a model pays one-time costs
    server = make_server(index, embedder, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {len(index)} images at http://{bound_host}:{bound_port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
