"""The test servers behave as the services they stand for: S3 via the standard environment, HTTP Range
with a request log, and a proxy whose faults a client actually sees."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from umt_distill.testing.servers import upload_folder


def test_s3_client_finds_the_server_through_the_environment(s3_server, tmp_path):
    import fsspec

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0123456789")
    url = upload_folder(tmp_path, s3_server.url("up"))
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # no endpoint given: AWS_ENDPOINT_URL
    assert fs.cat_file(f"{root}/a/x.bin", start=2, end=5) == b"234"


def test_http_server_ranges_log_and_listings(http_server, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(bytes(range(100)))
    server = http_server(tmp_path, listings=False)
    req = urllib.request.Request(f"{server.url}/d/f.bin", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == bytes(range(10, 20))
        assert r.headers["Content-Range"] == "bytes 10-19/100"
    with urllib.request.urlopen(f"{server.url}/d/f.bin") as r:
        assert r.status == 200 and len(r.read()) == 100
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.url}/d/")
    assert e.value.code == 404  # no listings
    assert [(e.path, e.range, e.status, e.bytes_sent) for e in server.log] == [
        ("/d/f.bin", "bytes=10-19", 206, 10), ("/d/f.bin", None, 200, 100), ("/d/", None, 404, 14)]


def test_fault_proxy_cuts_throttles_and_refuses(http_server, fault_proxy, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 100_000)
    proxy = fault_proxy(http_server(tmp_path).url)
    url = f"{proxy.endpoint}/f.bin"
    with urllib.request.urlopen(url) as r:
        assert len(r.read()) == 100_000  # healthy: passes through
    proxy.slow_down(1)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url)
    assert e.value.code == 503 and b"SlowDown" in e.value.read()
    proxy.drop_after(5000)
    with pytest.raises(Exception) as e, urllib.request.urlopen(url) as r:
        r.read()  # the body ends early: IncompleteRead
    assert proxy.cuts == 1
    with urllib.request.urlopen(url) as r:
        assert len(r.read()) == 100_000  # one cut only
    proxy.refuse()
    with pytest.raises(urllib.error.URLError) as e:
        urllib.request.urlopen(url)
    assert isinstance(e.value.reason, ConnectionRefusedError)
    proxy.refuse(False)
    with urllib.request.urlopen(url) as r:
        assert len(r.read()) == 100_000



def test_fault_proxy_passes_uploads_that_wait_for_100_continue(s3_server, fault_proxy, monkeypatch):
    """s3fs's PUTs say `Expect: 100-continue` and send the body only after the server's interim reply:
    the proxy forwards the head alone (a proxy that waits for the whole body hangs the upload); a throttled
    upload is answered 503 and retried by the client."""
    import s3fs

    proxy = fault_proxy(s3_server.endpoint)
    for key, value in s3_server.env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"read_timeout": 10, "connect_timeout": 5})
    body = bytes(range(256)) * 4096
    fs.pipe(f"{s3_server.bucket}/through/proxy.bin", body)
    assert fs.cat(f"{s3_server.bucket}/through/proxy.bin") == body
    proxy.slow_down(2)
    fs.pipe(f"{s3_server.bucket}/through/slowed.bin", body)
    assert proxy.slowed == 2
    assert fs.cat(f"{s3_server.bucket}/through/slowed.bin") == body
