"""`distill serve INDEX`: a local search page over an index, on the standard library's HTTP server.

Routes: `/` the page (`distill/assets/search.html`); `/api/search?q=..&k=..` JSON {query, k,
items, encode_ms, search_ms, total_ms, results: [{rank, index, id, score, caption, image}]};
`/api/info` JSON {items, embed_dim, embedder, query_embedder, model, backend, search}, models
by file name only, `search` the index kind and its parameters (`hnsw M=32 ef_search=64`);
`/image/<i>` item i as JPEG (its thumbnail, else read from its source).

Queries run one at a time (a lock): on a small CPU, parallel queries only make each slower,
and the latency the page shows stays the query's own. The page has no authentication, so
the server guards what it can: a Host header that is not an allowed name is a 421 (against
DNS rebinding); at most `workers` connections are handled at once, by one bounded pool, the
rest waiting in the listen backlog; a client has `timeout` seconds to send its request (a
watchdog thread closes one that trickles it) and a socket silent that long is closed; long
or malformed input is a 4xx (413 query, 400 `k` or image id, 414 request line, 431 headers).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from distill.deploy.embedders import Embedder, describe
from distill.deploy.search import query
from distill.deploy.search_index import SearchIndex
from distill.errors import ConfigError

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent.parent / "assets" / "search.html"
MAX_K = 100
MAX_QUERY = 1000  # characters of query text; a longer query is a 413
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("", "0.0.0.0", "::")
WORKERS, TIMEOUT, BACKLOG = 8, 10.0, 64
LINGER = 1.0  # seconds a closing connection reads what the client still sends
MAX_FIELDS = 16  # query-string fields parsed per request; more is a 400
IMAGE_ID = re.compile(r"[0-9]{1,12}")
K_VALUE = re.compile(r"[0-9]{1,4}")
PATH_WORD = re.compile(r"[^\s()'\"]*[\\/][^\s()'\"]*")


def host_name(header: str) -> str:
    """The host of a Host header, lower-case, without port, brackets or trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:  # name:8000 (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def allowed_host_names(host: str, bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names accepted: loopback, the bound address when specific, and `extra`."""
    names = {*LOOPBACK_HOSTS, *(host_name(name) for name in extra)}
    if host not in WILDCARDS:
        names |= {host_name(host), host_name(f"[{bound}]" if ":" in bound else bound)}
    return frozenset(names - {""})


def is_loopback(address: str) -> bool:
    """Whether a bound address can only be reached from this machine."""
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def file_names(text: str) -> str:
    """`text` with every path-like word (one holding / or \\) cut to its last part."""
    return PATH_WORD.sub(lambda m: re.split(r"[\\/]", m.group().rstrip("/\\"))[-1], text)


def check_options(workers: int, timeout: float, allowed_hosts: Iterable[str] = ()) -> None:
    """Raise one line per bad serving option.

    Raises:
        ConfigError: `workers` below 1, `timeout` not positive, or an empty or malformed host.
    """
    problems = []
    if workers < 1:
        problems.append(f"--workers: must be at least 1, got {workers}")
    if not timeout > 0:
        problems.append(f"--timeout: must be a positive number of seconds, got {timeout}")
    for name in allowed_hosts:
        if not host_name(name) or re.search(r"[\s/@]", name):
            problems.append(f"--allowed-host: {name!r} is not a host name or address")
    if problems:
        raise ConfigError(problems)


class Refused(Exception):
    """A request answered with a 4xx status and a one-line JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Connections:
    """The open connections of a server, and one watchdog thread over their deadlines.

    A connection is armed with a deadline while its request is being read; past it the
    watchdog shuts the socket down, which ends the worker's blocked read.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadlines: dict[socket.socket, float | None] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="distill-serve-watchdog", daemon=True)

    def add(self, conn: socket.socket) -> None:
        with self.lock:
            self.deadlines[conn] = None

    def discard(self, conn: socket.socket) -> None:
        with self.lock:
            self.deadlines.pop(conn, None)

    def arm(self, conn: socket.socket, on: bool = True) -> None:
        """Start (or stop) the clock: the request must be in within `timeout` seconds."""
        with self.lock:
            if conn in self.deadlines:
                self.deadlines[conn] = time.monotonic() + self.timeout if on else None

    def watch(self) -> None:
        tick = max(0.05, min(1.0, self.timeout / 4))
        while not self.stop.wait(tick):
            now = time.monotonic()
            with self.lock:  # under the lock: a worker closes its socket only after `discard`
                for conn, deadline in list(self.deadlines.items()):
                    if deadline is not None and deadline < now:
                        self.deadlines[conn] = None
                        log.debug("closing a connection whose request took over %.1f s", self.timeout)
                        shut(conn)

    def close(self) -> None:
        """Stop the watchdog and shut every open connection down."""
        self.stop.set()
        with self.lock:
            for conn in self.deadlines:
                shut(conn)


def shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SearchServer(HTTPServer):
    """An HTTP server that handles at most `workers` connections at once, on a bounded pool.

    Args:
        address: (host, port); port 0 takes any free port.
        handler: The request handler class.
        workers: Connections handled at once (threads of the pool).
        timeout: Seconds a client has to send its request, and to stay silent on a socket.
    """

    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 workers: int = WORKERS, timeout: float = TIMEOUT) -> None:  # fmt: skip
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.slots = threading.BoundedSemaphore(workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="distill-serve")  # its threads start on demand
        self.connections = Connections(timeout)
        self.stopping, self.stopped = threading.Event(), threading.Event()
        self.stopped.set()
        super().__init__(address, handler)  # binds; on failure calls server_close
        self.connections.thread.start()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until `shutdown()`, only while a worker is free."""
        self.stopping.clear()
        self.stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                while not self.stopping.is_set():
                    if not self.slots.acquire(timeout=poll_interval):
                        continue  # every worker is busy: new connections wait in the backlog
                    try:
                        conn, address = self.socket.accept() if selector.select(poll_interval) else (None, None)
                    except OSError:
                        conn = None
                    if conn is None:
                        self.slots.release()
                        continue
                    self.connections.add(conn)
                    self.pool.submit(self.work, conn, address)
        finally:
            self.stopped.set()

    def work(self, conn: socket.socket, address: Any) -> None:
        try:
            self.finish_request(conn, address)
        except Exception:
            self.handle_error(conn, address)
        finally:
            self.connections.discard(conn)
            self.shutdown_request(conn)
            self.slots.release()

    def shutdown_request(self, request: Any) -> None:
        """Half-close, read what the client still sends (at most `LINGER` seconds), close.

        Closing with unread input would reset the connection, and a client could lose the
        reply it has not read yet (a 414 or 431 answered before the request was all in).
        """
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(min(LINGER, self.connections.timeout))
            deadline = time.monotonic() + LINGER
            while request.recv(65536) and time.monotonic() < deadline:
                pass
        except OSError:
            pass
        request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)

    def shutdown(self) -> None:
        """Stop `serve_forever` (from another thread) and wait for it to return."""
        self.stopping.set()
        self.stopped.wait()

    def server_close(self) -> None:
        """Stop serving, close the listening socket and every open connection; stop the threads."""
        self.shutdown()  # no-op unless serving: nothing is submitted to the pool once it is shut down
        super().server_close()
        self.connections.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(index: SearchIndex, embedder: Embedder, host: str = "127.0.0.1", port: int = 8000, *,
                allowed_hosts: Iterable[str] = (), workers: int = WORKERS, timeout: float = TIMEOUT) -> SearchServer:  # fmt: skip
    """A server bound to (host, port) (port 0: any free port), not yet serving.

    Call `serve_forever()` on it (in a thread, for tests), `shutdown()` to stop it and
    `server_close()` to release it. Binding an address other machines can reach warns
    (logged, and printed on stderr): the page has no authentication.

    Args:
        index: The index to search.
        embedder: Encodes the queries.
        host: Address to listen on.
        port: Port to listen on.
        allowed_hosts: Host-header names accepted besides loopback and the bound address.
        workers: Connections handled at once.
        timeout: Seconds a client has to send its request, and to stay silent on a socket.

    Raises:
        ConfigError: A bad option, or an address that cannot be listened on.
    """
    allowed_hosts = list(allowed_hosts)
    check_options(workers, timeout, allowed_hosts)
    page = PAGE.read_bytes()
    lock = threading.Lock()
    info = {"items": len(index), "embed_dim": index.embed_dim, "embedder": file_names(index.embedder),
            "query_embedder": file_names(describe(embedder)), "model": file_names(index.model),
            "backend": index.backend, "search": index.describe()}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        server_version = "distill-serve"
        server: SearchServer

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def handle_one_request(self) -> None:
            self.server.connections.arm(self.connection)
            super().handle_one_request()

        def parse_request(self) -> bool:
            ok = super().parse_request()
            self.server.connections.arm(self.connection, on=False)  # the request is in
            return ok

        def send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")  # HTTP/1.0: an idle keep-alive would hold a worker
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, data: dict[str, Any]) -> None:
            self.send(status, json.dumps(data).encode(), "application/json")

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Every error as JSON {"error": ...}, the stdlib's own (400, 414, 431, 501) too."""
            self.log_error("code %d, message %s", code, message)
            self.close_connection = True
            self.send_json(code, {"error": message or HTTPStatus(code).phrase})

        def do_GET(self) -> None:
            try:
                hosts = self.headers.get_all("Host") or []
                if len(hosts) != 1:
                    raise Refused(400, "several Host headers" if hosts else "missing Host header")
                host = hosts[0]
                if host_name(host) not in allowed:
                    raise Refused(421, f"host {host[:100]!r} is not allowed (distill serve --allowed-host NAME)")
                if not self.path.startswith("/"):
                    raise Refused(400, "the request target must be a path")
                self.route(urlsplit(self.path))
            except Refused as e:
                self.send_error(e.status, str(e))
            except (ConnectionError, TimeoutError):
                raise  # the client went away or stalled: nothing to answer
            except Exception:
                log.exception("%s failed", self.path[:200])
                self.send_error(500, "internal error; see the server's log")

        def route(self, url: Any) -> None:
            if url.path in ("/", "/index.html"):
                self.send(200, page, "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self.send_json(200, info)
            elif url.path == "/api/search":
                try:
                    params = parse_qs(url.query, max_num_fields=MAX_FIELDS)
                except ValueError:
                    raise Refused(400, f"at most {MAX_FIELDS} query-string fields") from None
                self.search(params)
            elif url.path.startswith("/image/"):
                self.image(url.path.removeprefix("/image/"))
            else:
                raise Refused(404, f"no such page: {url.path[:200]}")

        def image(self, name: str) -> None:
            if not IMAGE_ID.fullmatch(name):
                raise Refused(400, f"an image id is a number from 0 to {len(index) - 1}")
            data = index.image_jpeg(int(name)) if int(name) < len(index) else None
            if data is None:
                raise Refused(404, f"no image {int(name)}")
            self.send(200, data, "image/jpeg", cache=True)

        def search(self, params: dict[str, list[str]]) -> None:
            text, k = params.get("q", [""])[0].strip(), params.get("k", ["10"])[0].strip()
            if not text:
                raise Refused(400, "empty query: pass ?q=some words")
            if len(text) > MAX_QUERY:
                raise Refused(413, f"query of {len(text)} characters; at most {MAX_QUERY}")
            if not K_VALUE.fullmatch(k) or not 1 <= int(k) <= MAX_K:
                raise Refused(400, f"k must be an integer between 1 and {MAX_K}")
            with lock:
                results = query(index, embedder, text, int(k))
            rows = results.rows(index)
            for row in rows:
                row["image"] = f"/image/{row['index']}"
            self.send_json(200, {
                "query": text, "k": int(k), "items": len(index), "encode_ms": results.encode_ms,
                "search_ms": results.search_ms, "total_ms": results.total_ms, "results": rows,
            })  # fmt: skip

    Handler.timeout = timeout  # of each socket read or write (StreamRequestHandler.setup applies it)
    try:
        server = SearchServer((host, port), Handler, workers=workers, timeout=timeout)
    except OSError as e:
        raise ConfigError(f"--host/--port: cannot listen on {host}:{port}: {e.strerror or e}") from e
    bound = str(server.server_address[0])
    allowed = allowed_host_names(host, bound, allowed_hosts)
    if not is_loopback(bound):
        warn(f"distill serve listens on {host_port(bound, server.server_address[1])}, which other machines can "
             f"reach: the page has no authentication, anyone who reaches it can search the index and see its "
             f"images; Host names accepted: {', '.join(sorted(allowed))} (add more with --allowed-host)")  # fmt: skip
    return server


def warn(message: str) -> None:
    """Print `warning: message` on stderr and log it (when logging is set up)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    if log.hasHandlers():  # without a handler, logging's last resort would print it a second time
        log.warning(message)


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url_of(server: SearchServer) -> str:
    """The address to open: loopback for a wildcard bind."""
    host, port = server.server_address[:2]
    return f"http://{host_port({'::': '::1', '0.0.0.0': '127.0.0.1'}.get(host, host), port)}/"


def serve(index: SearchIndex, embedder: Embedder, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve until interrupted (Ctrl-C), printing the address first.

    Args:
        index: The index to search.
        embedder: Encodes the queries.
        host: Address to listen on.
        port: Port to listen on.
        **options: `allowed_hosts`, `workers`, `timeout` of `make_server`.
    """
    server = make_server(index, embedder, host, port, **options)
    try:
        query(index, embedder, "warm up", 1)  # the first call of a model pays one-time costs
        print(f"serving {len(index)} images at {url_of(server)} (Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
