"""The writer lease of a store on object storage (``cache/remote_write.py``), against moto's S3 server on
127.0.0.1 (real HTTP, real botocore/s3fs, no mocked client): one holder at a time, the holder named to
the refused run, a lease that is no longer renewed (or whose holder process is dead) taken over, a
taken-over holder stopping, and a service that ignores conditional writes refused; and a large shard's
upload (multipart, then its sidecar)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from umt_distill.cache.lock import LOCK_FILE, StoreLockedError
from umt_distill.cache.remote_write import (
    UNSAFE_LEASE_ENV,
    RemoteLease,
    RemoteWriteError,
    _process_space,
    check_writable_url,
    filesystem,
)

_SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class _StripHeader(BaseHTTPRequestHandler):
    """Forwards each request to ``upstream`` without the header ``strip``: an S3 front-end that does not
    know conditional writes and ignores ``If-None-Match``, as some S3-compatible services do. The first
    ``slow[0]`` requests are answered ``503 SlowDown`` (S3's throttling) instead."""

    upstream: str = ""
    strip: str = ""
    slow: list[int]
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.slow[0] > 0:
            self.slow[0] -= 1
            self.send_response(503)
            self.send_header("Content-Length", str(len(_SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOW_DOWN)
            return
        target = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in (self.strip, "expect")}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_header_stripper():
    """A factory: ``http_header_stripper(endpoint, header, slow=None)`` → the URL of a proxy that drops
    ``header`` (and answers 503 while the counter ``slow[0]`` is positive, counting it down)."""
    servers = []

    def start(endpoint: str, header: str, slow: list[int] | None = None) -> str:
        handler = type("Handler", (_StripHeader,), {"upstream": endpoint, "strip": header.lower(),
                                                    "slow": slow if slow is not None else [0]})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _lease_object(url: str) -> dict | None:
    fs, root = filesystem(url)
    try:
        return json.loads(fs.cat_file(f"{root}/{LOCK_FILE}"))
    except FileNotFoundError:
        return None


def _plant(url: str, **info) -> None:
    """A lease object written as another run would have written it."""
    fs, root = filesystem(url)
    body = {"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "purpose": "cache-teacher",
            "seconds": 60, "token": "x", **info}
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps(body).encode())


def test_one_holder_at_a_time_and_the_refusal_names_it(s3_server) -> None:
    url = s3_server.url("lease-one")
    first = RemoteLease(url, "cache-teacher").acquire()
    try:
        held = _lease_object(url)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["seconds"] == 60
        with pytest.raises(StoreLockedError, match=f"being written by another run .*cache-teacher by pid {os.getpid()}"):
            RemoteLease(url, "cache verify --repair").acquire()
    finally:
        first.release()
    assert _lease_object(url) is None  # released: the object is gone
    second = RemoteLease(url, "cache verify --repair").acquire()  # and the store can be taken again
    second.release()


def test_a_lease_not_renewed_for_its_lifetime_is_taken_over_and_its_holder_stops(s3_server) -> None:
    url = s3_server.url("lease-stale")
    old = RemoteLease(url, "cache-teacher", seconds=1).acquire()
    old._stop.set()  # the holder stops renewing (as a stopped or cut-off process would)
    old._thread.join()
    with pytest.raises(StoreLockedError):  # still alive by the server's clock
        RemoteLease(url, "cache-teacher").acquire()
    deadline = time.time() + 10
    while True:
        try:
            new = RemoteLease(url, "cache-teacher").acquire()
            break
        except StoreLockedError:
            assert time.time() < deadline, "a lease not renewed for its lifetime was never taken over"
            time.sleep(0.25)
    try:
        assert _lease_object(url)["token"] == new.token
        # the old holder wakes up: before its next upload it renews the overdue lease, its If-Match
        # fails, and it stops writing
        with pytest.raises(RemoteWriteError, match="taken over"):
            old.check()
        assert old.lost
        assert _lease_object(url)["token"] == new.token  # its renewal did not overwrite the new lease
        old.release()  # gives back nothing: the lease is not its own any more
        assert _lease_object(url)["token"] == new.token
    finally:
        new.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(s3_server) -> None:
    url = s3_server.url("lease-dead")
    with open("/proc/sys/kernel/pid_max") as f:
        dead = int(f.read()) + 1  # no process can have it
    here = {"host": socket.gethostname(), "space": _process_space()}
    _plant(url, **here, pid=dead)  # a killed writer's lease, its lifetime not over
    lease = RemoteLease(url, "cache-teacher").acquire()
    lease.release()
    # the same pid proves nothing on another host, or in another PID namespace (a container sharing the
    # host name) or boot of this one
    for elsewhere in ({"host": "elsewhere"}, {"space": "another-boot/pid:[1]"}):
        _plant(url, **{**here, **elsewhere}, pid=dead)
        with pytest.raises(StoreLockedError, match="being written by another run"):
            RemoteLease(url, "cache-teacher").acquire()


def test_renewal_keeps_the_lease_alive(s3_server) -> None:
    url = s3_server.url("lease-renew")
    lease = RemoteLease(url, "cache-teacher", seconds=2).acquire()
    try:
        first = lease.etag
        time.sleep(3.2)  # past the lifetime: only the renewals (every 1 s) keep it
        assert lease.etag != first and not lease.lost
        with pytest.raises(StoreLockedError):
            RemoteLease(url, "cache-teacher").acquire()
    finally:
        lease.release()


def test_a_service_that_ignores_conditional_writes_is_refused(s3_server, http_header_stripper, monkeypatch) -> None:
    proxy = http_header_stripper(s3_server.endpoint, "if-none-match")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
    url = s3_server.url("lease-unsafe")
    with pytest.raises(RemoteWriteError, match="does not honour conditional writes"):
        RemoteLease(url, "cache-teacher").acquire()
    assert _lease_object(url) is None  # the probe's lease is removed
    monkeypatch.setenv(UNSAFE_LEASE_ENV, "1")  # the user says only one writer runs
    lease = RemoteLease(url, "cache-teacher").acquire()
    assert _lease_object(url)["token"] == lease.token
    lease.release()
    assert _lease_object(url) is None


def test_throttled_lease_requests_are_retried(s3_server, http_header_stripper, monkeypatch) -> None:
    """S3's 503 SlowDown on the first requests (the lease's look-up and conditional create) is retried with
    backoff (``umt_distill.storage.retrying``), and the lease is taken."""
    from umt_distill import storage

    monkeypatch.setattr(storage, "_SETTINGS", storage.configure(backoff_s=0.05))
    slow = [3]
    proxy = http_header_stripper(s3_server.endpoint, "x-none", slow)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
    url = s3_server.url("lease-throttled")
    lease = RemoteLease(url, "cache-teacher").acquire()
    assert slow == [0]  # three requests were throttled, and retried
    assert _lease_object(url)["token"] == lease.token
    lease.release()


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/store", "https://example.org/s", "gs://bucket/s"])
def test_stores_that_cannot_be_written_are_refused_in_one_line(url: str) -> None:
    with pytest.raises(RemoteWriteError) as e:
        check_writable_url(url)
    assert "\n" not in str(e.value) and url in str(e.value)
    assert ("read-only" in str(e.value)) == url.startswith("http")


def test_a_large_shard_goes_up_as_one_multipart_object_before_its_sidecar(s3_server, monkeypatch, tmp_path) -> None:
    """Above twice the part size a shard is a multipart upload (the object appears whole when the upload
    completes); the sidecar follows, and the local copy is dropped."""
    from umt_distill.cache import remote_write

    monkeypatch.setattr(remote_write, "UPLOAD_PART_BYTES", 5 * 2**20)  # S3's smallest part
    store = remote_write.RemoteStore(s3_server.url("multipart"), staging_parent=tmp_path)
    try:
        shards = store.staging / "shards"
        shards.mkdir()
        data = np.random.default_rng(0).integers(0, 256, 11 * 2**20, dtype=np.uint8).tobytes()
        (shards / "shard-000000.tar").write_bytes(data)
        sidecar = {"name": "shard-000000", "num_records": 1, "nbytes": len(data), "records": [["a", 0]]}
        (shards / "shard-000000.json").write_text(json.dumps(sidecar))
        store.publish_shard(sidecar)
        fs, root = filesystem(store.url)
        head = fs.call_s3("head_object", Bucket=root.split("/")[0], Key="multipart/shards/shard-000000.tar")
        assert head["ETag"].strip('"').endswith("-3")  # three parts
        assert fs.cat_file(f"{root}/shards/shard-000000.tar") == data
        assert json.loads(fs.cat_file(f"{root}/shards/shard-000000.json")) == sidecar
        assert not (shards / "shard-000000.tar").exists()
    finally:
        store.close()


def test_a_killed_writers_staging_folder_is_cleared_by_the_next_writer(tmp_path) -> None:
    """A SIGKILLed writer cannot delete its staging folder (a shard or two of data); the next writer on
    the machine deletes the folders of dead processes of its own boot and PID namespace, and no other."""
    from umt_distill.cache.remote_write import RemoteStore, _staging_prefix

    with open("/proc/sys/kernel/pid_max") as f:
        dead = int(f.read()) + 1
    killed = tmp_path / f"{_staging_prefix(dead)}abc"
    alive = tmp_path / f"{_staging_prefix(os.getpid())}def"  # a live writer's
    foreign = tmp_path / f"umt-distill-staging-0123456789-{dead}-ghi"  # another container's: its pids are not ours
    for folder in (killed, alive, foreign):
        (folder / "shards").mkdir(parents=True)
    store = RemoteStore("s3://bucket/prefix", staging_parent=tmp_path)  # no request is made before take()
    try:
        assert not killed.exists() and alive.exists() and foreign.exists() and store.staging.exists()
    finally:
        store.close()
    assert not store.staging.exists()
