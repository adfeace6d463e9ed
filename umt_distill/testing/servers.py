"""Servers on 127.0.0.1 for the object-storage tests and benchmarks: real protocols, no mocked client.

- :func:`start_s3_server`: moto's S3 API server (threaded, in this process) with one bucket, and the
  environment a client needs to find it through the standard places (``AWS_ENDPOINT_URL``, the key
  pair, the region): s3fs / botocore read them, no project flag is involved.
- :func:`start_http_server`: a static file server over a folder that honours ``Range`` (206 with
  ``Content-Range``), keeps connections alive, logs every request (method, path, range, body bytes
  sent) and can be started without directory listings (as object-storage HTTP front-ends are).
- :class:`FaultProxy`: a TCP proxy in front of either that injects the faults a reader must survive or
  name: a connection cut after N response bytes, ``503 SlowDown`` for the next M requests, refused
  connections (its listening socket closed: the client sees ECONNREFUSED).
- :func:`upload_folder`: copy a local store folder to a bucket prefix (what a user's ``aws s3 cp
  --recursive`` does), through fsspec.

Every server is stopped by its ``stop()``; the fixtures in ``tests/conftest.py`` do that.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "FaultProxy",
    "HttpServer",
    "RequestLog",
    "S3Server",
    "start_http_server",
    "start_s3_server",
    "upload_folder",
]

LOCALHOST = "127.0.0.1"


# --------------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Server:
    """A running moto S3 server: ``endpoint`` (``http://127.0.0.1:<port>``) and one ``bucket``."""

    endpoint: str
    bucket: str
    _server: Any = field(repr=False)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The variables an S3 client reads to reach this server (or ``endpoint``, e.g. a proxy in front
        of it): the standard ones, so the code under test runs as it would against AWS or MinIO."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe for credentials
        }

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def stop(self) -> None:
        self._server.stop()


def start_s3_server(bucket: str = "stores") -> S3Server:
    """Start moto's S3 server on 127.0.0.1 (a free port) and create ``bucket`` in it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", bucket, server)
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return s3


def upload_folder(local: str | Path, url: str, env: dict[str, str] | None = None) -> str:
    """Copy every file under the folder ``local`` to ``url`` (``s3://bucket/prefix``), keeping relative
    paths; returns ``url``. ``env``: variables to set meanwhile (:meth:`S3Server.env`)."""
    import fsspec

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        local = Path(local)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(local).as_posix()}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return url


# --------------------------------------------------------------------------------------------------
# HTTP


@dataclass
class RequestLog:
    """One request the HTTP server answered: ``range`` is the ``Range`` header as sent (or None)."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a reader's requests share connections, as with a real server
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the structured log is ``server.log``

    def _record(self, status: int, sent: int) -> None:
        with self.server.lock:
            self.server.log.append(RequestLog(self.command, urllib.parse.unquote(self.path.split("?", 1)[0]),
                                              self.headers.get("Range"), status, sent))

    def _error(self, status: int) -> None:
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        if self.command != "HEAD":
            self.wfile.write(body)
            sent = len(body)
        self._record(status, sent)

    def _target(self) -> Path | None:
        rel = urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/")
        root = Path(self.directory).resolve()
        path = (root / rel).resolve()
        return path if path == root or root in path.parents else None

    def do_HEAD(self) -> None:
        self._counted()

    def do_GET(self) -> None:
        self._counted()

    def _counted(self) -> None:
        # A client may hold the whole body before this thread logs it: `HttpServer.log` waits for the
        # requests in flight, so a test reads every request it made.
        with self.server.lock:
            self.server.in_flight += 1
        try:
            self._serve()
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _serve(self) -> None:
        path = self._target()
        if path is None or not path.exists():
            return self._error(404)
        if path.is_dir():
            if not self.server.listings:
                return self._error(404)
            return self._listing(path)
        size = path.stat().st_size
        start, end, status = 0, size, 200
        wanted = self.headers.get("Range")
        if wanted:
            m = _RANGE.match(wanted.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._error(416)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or end <= start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return self._record(416, 0)
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        sent = 0
        if self.command == "GET":
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start
                    while left:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        self._record(status, sent)

    def _listing(self, folder: Path) -> None:
        base = self.path.split("?", 1)[0].rstrip("/") + "/"
        links = "".join(f'<a href="{base}{urllib.parse.quote(p.name)}{"/" if p.is_dir() else ""}">{p.name}</a>\n'
                        for p in sorted(folder.iterdir()))
        body = f"<html><body>\n{links}</body></html>\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
        self._record(200, len(body) if self.command == "GET" else 0)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    listings: bool
    log: list[RequestLog]
    lock: threading.Lock
    in_flight: int


@dataclass
class HttpServer:
    """A running static file server: ``url`` (``http://127.0.0.1:<port>``) serves ``folder``; ``log``
    lists every request answered, in order."""

    url: str
    folder: Path
    _server: _HttpServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def log(self) -> list[RequestLog]:
        """The requests answered so far, once the ones in flight are logged (waits up to 5 s for them)."""
        deadline = time.monotonic() + 5.0
        while self._server.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._server.log

    def clear_log(self) -> None:
        with self._server.lock:
            self._server.log.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_http_server(folder: str | Path, listings: bool = True) -> HttpServer:
    """Serve ``folder`` on 127.0.0.1 (a free port); ``listings=False``: a folder's URL answers 404."""
    folder = Path(folder)

    def handler(*args: Any, **kwargs: Any) -> _Handler:
        return _Handler(*args, directory=str(folder), **kwargs)

    server = _HttpServer((LOCALHOST, 0), handler)
    server.listings, server.log, server.lock, server.in_flight = listings, [], threading.Lock(), 0
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="http-server", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return HttpServer(f"http://{host}:{port}", folder, server, thread)


# --------------------------------------------------------------------------------------------------
# faults

_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
              b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (``http://host:port``) that injects faults.

    It reads each HTTP request head on its way to the server (to answer it itself when throttling) and
    passes responses through byte for byte, counting them. Faults are armed at any time, from the test:

    - :meth:`drop_after`: after ``nbytes`` more response bytes, cut the connection carrying them (mid-body:
      a truncated response); ``times`` cuts, each after a fresh ``nbytes`` (``None``: the server dies
      there: every later response is cut before its first byte, until :meth:`heal`);
    - :meth:`slow_down`: answer the next ``requests`` requests ``503 SlowDown`` (S3's throttling reply);
    - :meth:`refuse`: close the listening socket (new connections are refused) and cut the open ones;
      ``refuse(False)`` listens on the same port again.

    ``requests`` counts the requests seen, ``cuts`` the connections cut, ``slowed`` the 503s sent,
    ``response_bytes`` the bytes passed to clients (headers included): what a reader fetched, across
    processes.
    """

    def __init__(self, target: str) -> None:
        parsed = urllib.parse.urlsplit(target)
        self.target = (parsed.hostname or LOCALHOST, parsed.port or 80)
        self.lock = threading.Lock()
        self.requests = self.cuts = self.slowed = self.response_bytes = 0
        self._budget: int | None = None  # response bytes until the next cut
        self._drop: tuple[int, int | None] | None = None  # (nbytes, cuts left: None = forever)
        self._slow = 0
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = False
        self.port = 0
        self._listen()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: give it to the client in place of the server's."""
        return f"http://{LOCALHOST}:{self.port}"

    # -- arming

    def drop_after(self, nbytes: int, times: int | None = 1) -> None:
        with self.lock:
            self._drop = (nbytes, times)
            self._budget = nbytes

    def slow_down(self, requests: int) -> None:
        with self.lock:
            self._slow = requests

    def refuse(self, on: bool = True) -> None:
        if on:
            listener, self._listener = self._listener, None
            if listener is not None:
                try:
                    listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone may not
                except OSError:
                    pass
                listener.close()
            self._cut_all()
        elif self._listener is None:
            self._listen()

    def heal(self) -> None:
        """No fault: pass everything through."""
        with self.lock:
            self._drop, self._budget, self._slow = None, None, 0
        self.refuse(False)

    def stop(self) -> None:
        self._stopped = True
        self.refuse(True)

    # -- plumbing

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOCALHOST, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="fault-proxy", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by refuse() / stop()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self._conns.update((client, upstream))
            send_lock = threading.Lock()
            threading.Thread(target=self._requests, args=(client, upstream, send_lock), daemon=True).start()
            threading.Thread(target=self._responses, args=(client, upstream, send_lock), daemon=True).start()

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with self.lock:
                self._conns.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _cut_all(self) -> None:
        with self.lock:
            conns = list(self._conns)
        self._close(*conns)

    def _requests(self, client: socket.socket, upstream: socket.socket, send_lock: threading.Lock) -> None:
        """Client → server: forward each request, or answer it 503 while throttling."""
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return self._close(client, upstream)
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                headers = _header_fields(head)
                if "chunked" in headers.get("transfer-encoding", ""):
                    # A streamed upload: pass the rest of the connection through unparsed.
                    upstream.sendall(head + b"\r\n\r\n" + buf)
                    return self._pipe(client, upstream)
                length = int(headers.get("content-length", "0") or 0)
                # `Expect: 100-continue` (botocore's uploads): the client sends the body only after the
                # server's interim 100 reply, so the head goes on alone and the body follows as it comes.
                expect = "100-continue" in headers.get("expect", "").lower()
                while not expect and len(buf) < length:
                    data = client.recv(65536)
                    if not data:
                        return self._close(client, upstream)
                    buf += data
                with self.lock:
                    self.requests += 1
                    throttle = self._slow > 0
                    if throttle:
                        self._slow -= 1
                        self.slowed += 1
                if throttle:
                    reply = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                             + str(len(_SLOW_DOWN)).encode() + b"\r\nRetry-After: 0\r\n"
                             + (b"Connection: close\r\n" if expect else b"") + b"\r\n"
                             + (b"" if head.startswith(b"HEAD ") else _SLOW_DOWN))
                    with send_lock:
                        client.sendall(reply)
                    if expect:  # whether the body still comes is the client's choice: end the connection
                        return self._close(client, upstream)
                    buf = buf[length:]
                    continue
                if expect:
                    upstream.sendall(head + b"\r\n\r\n")
                    while length > 0:
                        data = buf or client.recv(65536)
                        if not data:
                            return self._close(client, upstream)
                        part, buf = data[:length], data[length:]
                        upstream.sendall(part)
                        length -= len(part)
                    continue
                body, buf = buf[:length], buf[length:]
                upstream.sendall(head + b"\r\n\r\n" + body)
        except OSError:
            self._close(client, upstream)

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        self._close(client, upstream)

    def _responses(self, client: socket.socket, upstream: socket.socket, send_lock: threading.Lock) -> None:
        """Server → client: pass the bytes through, cutting the connection when the drop budget runs out."""
        try:
            while data := upstream.recv(65536):
                cut = False
                with self.lock:
                    if self._budget is not None:
                        if len(data) > self._budget:
                            data, cut = data[: self._budget], True
                            nbytes, left = self._drop  # type: ignore[misc]
                            if left is None:  # dead from here on
                                self._budget = 0
                            else:
                                self._drop = None if left == 1 else (nbytes, left - 1)
                                self._budget = None if left == 1 else nbytes
                            self.cuts += 1
                        else:
                            self._budget -= len(data)
                with send_lock:
                    client.sendall(data)
                with self.lock:
                    self.response_bytes += len(data)
                if cut:
                    break
        except OSError:
            pass
        self._close(client, upstream)


def _header_fields(head: bytes) -> dict[str, str]:
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1").lower()
    return fields
