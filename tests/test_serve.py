"""`distill serve`'s guards, over loopback with real sockets: Host header, timeouts, bounded
workers, input limits, the non-loopback warning, and no absolute path in /api/info."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from distill.commands.cli import main
from distill.deploy.search_index import SearchIndex, index_images, save_search_index
from distill.deploy.serve import MAX_QUERY, SearchServer, make_server
from distill.deploy.sources import parse_source
from distill.errors import ConfigError
from tests.test_search import ColourEmbedder

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class StubEmbedder(ColourEmbedder):
    """The colour embedder of tests/test_search.py, whose description holds an absolute
    path, like a checkpoint's does."""

    def __init__(self, path: str = "/nowhere/stub.ckpt") -> None:
        self.path = path

    def describe(self) -> str:
        return f"checkpoint {self.path} model student (Stub, dim 3, torch)"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    """Three colour squares, indexed as if by a checkpoint under an absolute path."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "photos"
    folder.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (24, 24), colour).save(folder / f"{name}.png")
    ckpt = str(root / "runs" / "demo" / "final.ckpt")
    data, _ = index_images([parse_source(str(folder))], StubEmbedder(ckpt), model=f"{ckpt}:student", progress=False)
    return SearchIndex(data)


@contextmanager
def running(index: SearchIndex, **options: object) -> Iterator[tuple[SearchServer, int]]:
    """A server on a free loopback port, serving in a thread; yields it and its port."""
    server = make_server(index, StubEmbedder(), "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def get(port: int, path: str, host: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """GET path with a given Host header (default 127.0.0.1:port); the status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, then read the whole reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_routes_still_answer(index: SearchIndex) -> None:
    with running(index) as (_, port):
        status, body = get(port, "/")
        assert status == 200 and b"distill search" in body
        status, body = get(port, "/api/search?q=something+green&k=2")
        data = json.loads(body)
        assert status == 200 and data["k"] == 2 and data["results"][0]["id"] == "green.png"
        status, body = get(port, data["results"][0]["image"])
        assert status == 200 and body[:2] == b"\xff\xd8"
        assert get(port, "/nope")[0] == 404 and get(port, "/api/search?q=")[0] == 400


def test_a_foreign_host_header_is_refused(index: SearchIndex) -> None:
    with running(index, allowed_hosts=["photos.lan"]) as (_, port):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.:x:y"):
            status, body = get(port, "/api/info", host=host)
            assert status == 421 and "not allowed" in json.loads(body)["error"], host
        assert get(port, "/api/search?q=red", host="rebind.attacker.example")[0] == 421
        for host in (f"127.0.0.1:{port}", "127.0.0.1", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "[::1]",
                     "photos.lan", f"photos.lan:{port}"):  # fmt: skip
            assert get(port, "/api/info", host=host)[0] == 200, host
        reply = raw(port, b"GET /api/info HTTP/1.0\r\n\r\n")  # no Host header at all
        assert reply.startswith(b"HTTP/1.0 400") and b"missing Host header" in reply
        reply = raw(port, b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 400") and b"several Host headers" in reply


def test_an_idle_or_trickling_client_is_dropped_after_the_timeout(index: SearchIndex) -> None:
    with running(index, timeout=0.5) as (_, port):
        idle = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        assert closed_within(idle, 5), "an idle connection stayed open"
        assert 0.4 < time.monotonic() - start < 5
        idle.close()
        # a client that trickles its request a byte at a time is dropped as well
        trickle = socket.create_connection(("127.0.0.1", port))
        start, dropped = time.monotonic(), False
        for byte in b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 200:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                dropped = True
                break
            if closed_within(trickle, 0.1):
                dropped = True
                break
        assert dropped and time.monotonic() - start < 5, "a trickling client held its worker"
        trickle.close()
        assert get(port, "/api/info")[0] == 200


def test_more_slow_clients_than_workers_use_no_more_threads(index: SearchIndex) -> None:
    before = set(threading.enumerate())
    with running(index, workers=2, timeout=0.5) as (_, port):
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for sock in slow:
            sock.sendall(b"GET /api/info HTTP/1.1\r\n")  # and never the rest
        seen = []  # threads started since, sampled while the slow clients hold the workers
        for _ in range(20):
            seen.append([t.name for t in set(threading.enumerate()) - before])
            time.sleep(0.05)
        assert max(sum(n.startswith("distill-serve_") for n in names) for names in seen) == 2, seen  # no more
        assert max(len(names) for names in seen) <= 2 + 2, seen  # the pool, the accept loop, the watchdog
        # a real client waits in the backlog and is answered once the slow ones time out
        assert get(port, "/api/info", timeout=30)[0] == 200
        new = [t.name for t in set(threading.enumerate()) - before]
        assert len(new) <= 2 + 2, new
        for sock in slow:
            sock.close()


def test_overlong_or_bad_inputs_are_4xx(index: SearchIndex) -> None:
    with running(index) as (_, port):
        status, body = get(port, f"/api/search?q={'r' * (MAX_QUERY + 1)}")
        assert status == 413 and f"at most {MAX_QUERY}" in json.loads(body)["error"]
        assert get(port, f"/api/search?q=red{'d' * (MAX_QUERY - 3)}")[0] == 200
        for k in ("abc", "0", "101", "-1", "1.5", "9" * 5000, "%D9%A3"):
            status, body = get(port, f"/api/search?q=red&k={k}")
            assert status == 400 and "k must be" in json.loads(body)["error"], k
        assert get(port, "/api/search?" + "&".join(f"f{i}=1" for i in range(50)) + "&q=red")[0] == 400
        assert raw(port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.0 414")
        reply = raw(port, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 431") and b'{"error": ' in reply
        assert raw(port, b"GET http://evil.example/api/info HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert get(port, "/api/info")[0] == 200


def test_a_huge_image_id_is_a_4xx_and_the_server_answers_on(index: SearchIndex) -> None:
    with running(index) as (_, port):
        for name, want in (("9" * 5000, 400), ("-1", 400), ("1e3", 400), ("%D9%A3", 400), ("", 400), ("3", 404), ("99", 404)):
            status, body = get(port, f"/image/{name}")
            assert status == want and "error" in json.loads(body), name
        status, body = get(port, "/image/2")
        assert status == 200 and body[:2] == b"\xff\xd8"
        assert get(port, "/api/info")[0] == 200


def test_a_non_loopback_bind_warns(index: SearchIndex, capsys: pytest.CaptureFixture[str],
                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="distill.deploy.serve"):
        server = make_server(index, StubEmbedder(), "0.0.0.0", 0)
        server.server_close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "no authentication" in err[0] and "--allowed-host" in err[0]
    assert any("no authentication" in r.getMessage() for r in caplog.records)
    caplog.clear()
    make_server(index, StubEmbedder(), "127.0.0.1", 0).server_close()
    assert capsys.readouterr().err == "" and not caplog.records


def test_info_holds_no_absolute_path(index: SearchIndex) -> None:
    assert index.model.startswith("/")  # the index itself records the absolute path
    with running(index) as (_, port):
        status, body = get(port, "/api/info")
    info = json.loads(body)
    assert status == 200 and info["model"] == "final.ckpt:student" and info["items"] == 3
    assert info["embedder"] == "checkpoint final.ckpt model student (Stub, dim 3, torch)"
    assert info["query_embedder"] == "checkpoint stub.ckpt model student (Stub, dim 3, torch)"
    text = body.decode()
    assert "/nowhere" not in text and str(Path(index.model).parent) not in text and "/" not in text


def test_bad_options_are_one_line(index: SearchIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_search_index(index.data, tmp_path / "i.idx")
    for option, value, message in (("--workers", "0", "--workers: must be at least 1"),
                                   ("--timeout", "0", "--timeout: must be a positive number"),
                                   ("--allowed-host", "a b", "--allowed-host: 'a b' is not a host")):  # fmt: skip
        assert main(["serve", str(path), option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=r"^--host/--port: cannot listen on 127\.0\.0\.1:\d+: "):
            make_server(index, StubEmbedder(), "127.0.0.1", taken.getsockname()[1])
