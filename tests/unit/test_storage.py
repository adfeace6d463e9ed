"""umt_distill.storage against a real HTTP server and fault proxy on 127.0.0.1: the ranges asked for come
back whole, in few requests, faults are retried and then named as the network, the read-ahead and the
local cache stay within their bounds."""

from __future__ import annotations

import os

import pytest

from umt_distill import storage


@pytest.fixture(autouse=True)
def _settings():
    before = storage.settings()
    storage.configure(backoff_s=0.01, retries=3)
    storage.STATS.reset()
    yield
    storage.configure(**before.__dict__)


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(1 << 20)
    (tmp_path / "blob.bin").write_bytes(data)
    return tmp_path, data


def test_paths_and_urls_are_kept_apart(tmp_path) -> None:
    assert storage.store_root("http://host/x/") == "http://host/x"  # not Path's http:/host/x
    assert storage.store_root(f"file://{tmp_path}") == tmp_path
    assert storage.join("s3://b/p/", "shards", "a.tar") == "s3://b/p/shards/a.tar"
    assert not storage.is_url(tmp_path) and storage.is_url("s3://b/p")


def test_coalesce_merges_neighbours_up_to_a_block_and_splits_longer_ranges() -> None:
    assert storage.coalesce([(0, 10), (10, 20), (25, 30), (100, 110)], block=64, gap=5) == [(0, 30), (100, 110)]
    assert storage.coalesce([(0, 50), (50, 100)], block=64, gap=0) == [(0, 50), (50, 100)]
    assert storage.coalesce([(0, 150)], block=64, gap=0) == [(0, 64), (64, 128), (128, 150)]


def test_ranges_come_back_exact_in_coalesced_requests(blob, http_server) -> None:
    folder, data = blob
    server = http_server(folder, listings=False)
    storage.configure(block_bytes=256 << 10, gap_bytes=0)
    ranges = [(i * 4096, i * 4096 + 4096) for i in range(0, 200, 2)] + [(900_000, 1 << 20)]
    got = storage.fetch_ranges(f"{server.url}/blob.bin", ranges)
    assert all(got[(s, e)] == data[s:e] for s, e in ranges)
    sent = sum(e.bytes_sent for e in server.log)
    assert sent == sum(e - s for s, e in ranges)  # no byte fetched that was not asked for (gap 0)
    assert len(server.log) == len(storage.coalesce(ranges, 256 << 10, 0)) == 101
    server.clear_log()
    storage.configure(gap_bytes=4096)  # the 4 KiB holes are now fetched: 1 request per 256 KiB
    storage.fetch_ranges(f"{server.url}/blob.bin", ranges)
    assert len(server.log) <= 5


def test_faults_are_retried_then_named_as_the_network(blob, http_server, fault_proxy) -> None:
    folder, data = blob
    proxy = fault_proxy(http_server(folder).url)
    url = f"{proxy.endpoint}/blob.bin"
    storage.configure(retries=4)
    proxy.drop_after(100_000, times=2)
    proxy.slow_down(1)
    assert storage.fetch_range(url, 1000, 500_000) == data[1000:501_000]
    assert proxy.cuts == 2 and proxy.slowed == 1
    proxy.slow_down(10)
    with pytest.raises(storage.NetworkError, match=r"blob\.bin: the network failed after 4 tries"):
        storage.fetch_range(url, 0, 10)
    proxy.heal()
    proxy.refuse()
    with pytest.raises(storage.NetworkError, match="network"):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError):  # a missing file is not retried, nor called the network
        proxy.heal()
        storage.read_bytes(f"{proxy.endpoint}/absent.bin")


def test_read_ahead_yields_in_order_and_holds_at_most_its_bound(blob, http_server) -> None:
    folder, data = blob
    server = http_server(folder)
    url = f"{server.url}/blob.bin"
    storage.configure(read_ahead=1, read_ahead_bytes=1 << 20)
    items = [(url, i * 65536, 65536) for i in range(16)]
    out = [chunk for _, chunk in storage.read_ahead(items, lambda item: item)]
    assert b"".join(out) == data
    assert storage.STATS.read_ahead_peak <= 2 * 65536  # the range being read and one ahead


def test_the_local_cache_serves_repeats_and_stays_within_its_size(blob, http_server, tmp_path) -> None:
    folder, data = blob
    server = http_server(folder)
    url = f"{server.url}/blob.bin"
    cache = tmp_path / "cache"
    storage.configure(cache_dir=str(cache), cache_bytes=300_000)
    for i in range(4):
        assert storage.fetch_range(url, i * 100_000, 100_000) == data[i * 100_000 : (i + 1) * 100_000]
    requests = len(server.log)
    assert storage.fetch_range(url, 300_000, 100_000) == data[300_000:400_000]
    assert len(server.log) == requests  # served from the cache
    assert sum(p.stat().st_size for p in cache.glob("*.bin")) <= 300_000


def test_lazy_read_ahead_draws_items_only_as_far_as_it_reaches(blob, http_server) -> None:
    folder, data = blob
    url = f"{http_server(folder).url}/blob.bin"
    storage.configure(read_ahead=2)
    drawn = []

    def items():
        for i in range(16):
            drawn.append(i)
            yield i

    got = []
    for i, chunk in storage.read_ahead(items(), lambda i: (url, i * 65536, 65536)):
        assert len(drawn) <= i + 4  # this one, two ahead, and one drawn when the window reopens
        got.append(chunk)
    assert b"".join(got) == data


def test_workers_sharing_the_cache_fetch_a_range_once(blob, http_server, tmp_path) -> None:
    """Loader workers (threads here; processes alike: the lock is a file) wanting the same range at once:
    one request, the others read its copy."""
    from concurrent.futures import ThreadPoolExecutor

    folder, data = blob
    server = http_server(folder)
    storage.configure(cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: storage.fetch_range(f"{server.url}/blob.bin", 4096, 500_000), range(4)))
    assert all(g == data[4096:504_096] for g in got)
    assert [e.range for e in server.log] == ["bytes=4096-504095"]
