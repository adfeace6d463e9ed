"""Where a store lies: a local folder or a URL on object storage (``s3://``, ``http(s)://``, any fsspec
protocol), and how bytes are fetched from it.

A reader over the network must fetch only the bytes it uses, in few requests, and must tell the user
the truth when the network fails. This module does that for every store reader:

- :func:`is_url`, :func:`join`, :func:`store_root`: a URL stays a string (``Path("http://h/x")`` would
  make it ``http:/h/x``); a local path stays a path.
- :func:`filesystem`: the fsspec filesystem of a URL, configured from the standard places only
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
  fsspec's own config); no project flag.
- :func:`retrying`: bounded retries with exponential backoff for what the network does (connection
  refused or reset, 5xx, ``503 SlowDown``, a body cut short), then a :class:`NetworkError` that names
  the URL and says it is the network: never "damaged". A missing file (404) is not retried.
- :func:`fetch_range` / :func:`fetch_ranges`: byte ranges, coalesced into requests of at most
  ``block_bytes`` (8–16 MB by default), fetched concurrently, each checked for its full length.
- :func:`read_ahead`: whole shard ranges in order, the next ones fetched in the background (bounded in
  count and bytes), optionally kept in a size-bounded local cache folder.
- :class:`PrefetchStore` (zarr): a zarr store over a URL whose chunk reads are served from ranges
  fetched ahead in one coalesced batch, with the same retries.

Settings (:class:`StorageSettings`) come from the recipe's ``storage:`` section (:func:`configure`).
``STATS`` counts requests and bytes fetched (benchmarks and tests read it).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

__all__ = [
    "STATS",
    "NetworkError",
    "StorageSettings",
    "configure",
    "configure_from",
    "exists",
    "fetch_range",
    "fetch_ranges",
    "filesystem",
    "is_network_error",
    "is_url",
    "join",
    "read_ahead",
    "read_bytes",
    "read_text",
    "retrying",
    "settings",
    "size",
    "store_root",
]

T = TypeVar("T")


class NetworkError(RuntimeError):
    """Reading a store over the network failed after every retry: the connection, not the store's bytes.

    Deliberately not an ``OSError`` (readers turn unreadable files into "damaged" reports) and not a
    :class:`~umt_distill.cache.record.StoreDamagedError`.
    """

    def __init__(self, url: str, attempts: int, cause: BaseException) -> None:
        detail = f"{type(cause).__name__}: {cause}".replace("\n", " ")[:300]
        where = "endpoint (AWS_ENDPOINT_URL) and credentials" if url.startswith("s3") else "server"
        super().__init__(f"{url}: the network failed after {attempts} tries ({detail}); a network fault, not the "
                         f"store's bytes: check the connection and the {where}, then re-run")
        self.url, self.attempts = url, attempts


@dataclass
class StorageSettings:
    """How stores on object storage are read (the recipe's ``storage:`` section)."""

    block_bytes: int = 16 << 20
    """Largest single request: neighbouring byte ranges are merged up to this size."""
    gap_bytes: int = 64 << 10
    """Ranges closer than this are merged (the bytes between them fetched and dropped)."""
    read_ahead: int = 2
    """Shards (byte ranges) streaming fetches ahead of the one being read, in the background."""
    read_ahead_bytes: int = 512 << 20
    """At most this many bytes fetched ahead and not yet read."""
    retries: int = 5
    """Tries of one request before :class:`NetworkError`."""
    backoff_s: float = 0.5
    """Wait before the second try; doubled before each further one (capped at 8 s)."""
    cache_dir: str | None = None
    """Keep fetched shard ranges here (a local folder) and read them from it next time."""
    cache_bytes: int = 0
    """The most bytes ``cache_dir`` holds; the least recently used ranges are deleted beyond it."""
    concurrency: int = 8
    """Requests in flight at once."""


_SETTINGS = StorageSettings()


def settings() -> StorageSettings:
    return _SETTINGS


def configure(**values: Any) -> StorageSettings:
    """Set the process's storage settings (unknown names are refused); returns them."""
    global _SETTINGS
    _SETTINGS = StorageSettings(**{**_SETTINGS.__dict__, **values})
    return _SETTINGS


def configure_from(section: Any) -> StorageSettings:
    """Apply a recipe's ``storage:`` section (``config.StorageConfig``) to this process."""
    return configure(block_bytes=int(section.block_mb) << 20, read_ahead=section.read_ahead,
                     read_ahead_bytes=int(section.read_ahead_mb) << 20, retries=section.retries,
                     backoff_s=section.backoff_s, cache_dir=section.cache_dir,
                     cache_bytes=int(section.cache_gb * 2**30))


@dataclass
class _Stats:
    """Requests sent and body bytes received by this process's store reads (all threads)."""

    requests: int = 0
    bytes: int = 0
    read_ahead_peak: int = 0
    _held: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int, nbytes: int) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes

    def hold(self, nbytes: int) -> None:
        with self.lock:
            self._held += nbytes
            self.read_ahead_peak = max(self.read_ahead_peak, self._held)

    def reset(self) -> None:
        with self.lock:
            self.requests = self.bytes = self.read_ahead_peak = self._held = 0


STATS = _Stats()


# --------------------------------------------------------------------------------------------------
# paths


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local file."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def store_root(path: str | Path) -> str | Path:
    """A store location as readers keep it: a URL as a string without a trailing slash, else a Path."""
    if is_url(path):
        return str(path).rstrip("/")
    text = str(path)
    return Path(text.removeprefix("file://"))


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for a URL or a local path (a string)."""
    text = str(root).rstrip("/")
    return "/".join([text, *(p.strip("/") for p in parts)])


_FS: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def _fs_options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        # Retries are this module's (bounded, reported as NetworkError): botocore and s3fs try once each.
        return {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    return {}


def _quiet(fs: Any) -> Any:
    if hasattr(fs, "retries"):  # s3fs's own retry loop (an attribute, not an option)
        fs.retries = 1
    return fs


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url``; endpoint and credentials from the environment.

    One filesystem per protocol and endpoint environment: a changed ``AWS_ENDPOINT_URL`` (another
    server) gets a new one rather than fsspec's cached instance for the old endpoint.
    """
    import fsspec

    protocol = url.split("://", 1)[0]
    key = (protocol, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            fs = _quiet(fsspec.filesystem(protocol, skip_instance_cache=True, **_fs_options(protocol)))
            _FS[key] = fs
    return fs, fs._strip_protocol(url) if protocol not in ("http", "https") else url


# --------------------------------------------------------------------------------------------------
# faults


def _status_of(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(e, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


_NETWORK_WORDS = ("slowdown", "slow down", "service unavailable", "internal error", "internalerror",
                  "connection reset", "connection refused", "connect to endpoint", "server disconnected",
                  "payload", "timed out", "timeout", "broken pipe", "bad gateway", "gateway")


def is_network_error(e: BaseException) -> bool:
    """Whether ``e`` is the network or a server's transient state (retry it), not the store's content.

    Missing files, permissions and bad requests are not: retrying cannot help, and they are reported as
    what they are.
    """
    if isinstance(e, NetworkError):
        return True
    if isinstance(e, FileNotFoundError):  # fsspec's HTTP info() says "not found" for any failure: ask why
        cause = e.__cause__
        return cause is not None and cause is not e and is_network_error(cause)
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = _status_of(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    try:
        import aiohttp

        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError)):
            return True
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(e, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError, EOFError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                                               errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.EIO):
        return True
    text = str(e).lower()
    if any(word in text for word in _NETWORK_WORDS):
        return True
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_network_error(cause)


class _Truncated(ConnectionError):
    """A response body shorter than the range asked for."""


def _delay(attempt: int) -> float:
    return min(8.0, _SETTINGS.backoff_s * (2 ** attempt))


def retrying(fn: Callable[[], T], url: str) -> T:
    """``fn()``, tried again after a network fault (up to ``settings().retries`` tries), then
    :class:`NetworkError` naming ``url``. Any other error passes through at once."""
    tries = max(1, _SETTINGS.retries)
    for attempt in range(tries):
        try:
            return fn()
        except NetworkError:
            raise
        except Exception as e:
            if not is_network_error(e):
                raise
            if attempt == tries - 1:
                raise NetworkError(url, tries, e) from e
            time.sleep(_delay(attempt))
    raise AssertionError("unreachable")


async def retrying_async(fn: Callable[[], Any], url: str) -> Any:
    """:func:`retrying` for a coroutine factory (sleeps without blocking the event loop)."""
    tries = max(1, _SETTINGS.retries)
    for attempt in range(tries):
        try:
            return await fn()
        except NetworkError:
            raise
        except Exception as e:
            if not is_network_error(e):
                raise
            if attempt == tries - 1:
                raise NetworkError(url, tries, e) from e
            await asyncio.sleep(_delay(attempt))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# whole files and metadata


def exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(store_root(path)).exists()
    fs, inner = filesystem(str(path))

    def probe() -> bool:  # not fs.exists: over HTTP it answers False when the server is down
        try:
            fs.info(inner)
        except FileNotFoundError as e:
            if is_network_error(e):
                raise
            return False
        return True

    return retrying(probe, str(path))


def size(path: str | Path) -> int:
    """A file's size in bytes; FileNotFoundError if it is missing."""
    if not is_url(path):
        return os.path.getsize(store_root(path))
    fs, inner = filesystem(str(path))
    return int(retrying(lambda: fs.size(inner), str(path)))


def read_bytes(path: str | Path) -> bytes:
    """A whole (small) file: metadata such as ``spec.json`` and ``index.json``."""
    if not is_url(path):
        return Path(store_root(path)).read_bytes()
    fs, inner = filesystem(str(path))

    def get() -> bytes:
        data = bytes(fs.cat_file(inner))
        STATS.add(1, len(data))
        return data

    return retrying(get, str(path))


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


# --------------------------------------------------------------------------------------------------
# byte ranges


def coalesce(ranges: Iterable[tuple[int, int]], block: int, gap: int) -> list[tuple[int, int]]:
    """Merge sorted-or-not ``[start, end)`` ranges: overlapping or within ``gap`` bytes of each other,
    up to ``block`` bytes per merged range (a single range longer than ``block`` is split)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(set(ranges)):
        if out and start - out[-1][1] <= gap and max(end, out[-1][1]) - out[-1][0] <= block:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    pieces = []
    for start, end in out:  # split what is still longer than a block (one huge range)
        pieces.extend((s, min(end, s + block)) for s in range(start, end, max(1, block)))
    return pieces


def fetch_ranges(url: str, ranges: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The bytes of each ``[start, end)`` of one file, fetched in coalesced requests (concurrently,
    each checked for its full length and retried); ``{range: bytes}``."""
    if not ranges:
        return {}
    if not is_url(url):
        with open(store_root(url), "rb") as f:
            out = {}
            for start, end in ranges:
                f.seek(start)
                out[(start, end)] = f.read(end - start)
            return out
    blocks = coalesce(ranges, _SETTINGS.block_bytes, _SETTINGS.gap_bytes)
    fs, inner = filesystem(url)
    got: dict[tuple[int, int], bytes] = {}
    todo = list(blocks)
    tries = max(1, _SETTINGS.retries)
    for attempt in range(tries):
        results = fs.cat_ranges([inner] * len(todo), [s for s, _ in todo], [e for _, e in todo],
                                on_error="return", batch_size=_SETTINGS.concurrency)
        failed, cause = [], None
        for (start, end), data in zip(todo, results):
            if isinstance(data, BaseException):
                if not is_network_error(data):
                    raise data
                failed.append((start, end))
                cause = data
                continue
            STATS.add(1, len(data))
            if len(data) != end - start:
                failed.append((start, end))
                cause = _Truncated(f"bytes [{start}, {end}): the response held {len(data)} of {end - start} bytes")
                continue
            got[(start, end)] = bytes(data)
        if not failed:
            break
        if attempt == tries - 1:
            raise NetworkError(url, tries, cause or _Truncated("no response"))
        todo = failed
        time.sleep(_delay(attempt))
    out = {}
    for start, end in ranges:
        out[(start, end)] = _slice(got, start, end)
    return out


def _slice(blocks: dict[tuple[int, int], bytes], start: int, end: int) -> bytes:
    parts = []
    at = start
    for (s, e), data in sorted(blocks.items()):
        if e <= at or s >= end:
            continue
        parts.append(data[at - s : min(e, end) - s])
        at = min(e, end)
        if at >= end:
            break
    return b"".join(parts)


def fetch_range(url: str, offset: int = 0, nbytes: int | None = None) -> bytes:
    """Bytes ``[offset, offset + nbytes)`` of a file (``None``: to its end), in requests of at most
    ``block_bytes``, through the local cache when one is configured."""
    if nbytes is None:
        nbytes = size(url) - offset
    if nbytes <= 0:
        return b""
    cached = _cache_path(url, offset, nbytes)
    if cached is None:
        return fetch_ranges(url, [(offset, offset + nbytes)])[(offset, offset + nbytes)]
    # One fetch per range per machine: loader workers and ranks sharing the cache folder wait for the
    # first one's fetch (a lock file per range) and read its copy.
    import fcntl

    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = cached.read_bytes()
            if len(data) == nbytes:
                os.utime(cached)  # most recently used
                return data
        except FileNotFoundError:
            pass
        data = fetch_ranges(url, [(offset, offset + nbytes)])[(offset, offset + nbytes)]
        _cache_put(cached, data)
        return data


def _cache_path(url: str, offset: int, nbytes: int) -> Path | None:
    if not (_SETTINGS.cache_dir and _SETTINGS.cache_bytes > 0 and is_url(url)):
        return None
    digest = hashlib.sha256(f"{url}\0{offset}\0{nbytes}".encode()).hexdigest()[:32]
    return Path(_SETTINGS.cache_dir) / f"{digest}.bin"


def _cache_put(path: Path, data: bytes) -> None:
    """Keep ``data`` in the cache folder (atomically), then delete the least recently used entries
    beyond ``cache_bytes``. A range larger than the whole cache is not kept."""
    if len(data) > _SETTINGS.cache_bytes:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    entries = []
    for p in path.parent.glob("*.bin"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(s for _, s, _ in entries)
    for _, nbytes, p in sorted(entries):
        if total <= _SETTINGS.cache_bytes:
            break
        if p != path:
            p.unlink(missing_ok=True)
            p.with_suffix(".lock").unlink(missing_ok=True)
            total -= nbytes


def read_ahead(items: Iterable[T], where: Callable[[T], tuple[str, int, int | None]]) -> Iterator[tuple[T, bytes]]:
    """``(item, bytes of where(item))`` for each item in order, the ranges of the next
    ``settings().read_ahead`` items fetched in a background thread meanwhile.

    For a lazy sequence (a training run's positions): items are drawn from ``items`` in the caller's
    thread, only as far ahead as the read-ahead reaches; the fetching thread sees ranges only. At most
    ``read_ahead_bytes`` of ranges of known size are in flight beyond the first.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def fetch(url: str, offset: int, nbytes: int | None) -> bytes:
        data = fetch_range(url, offset, nbytes)
        STATS.hold(len(data))
        return data

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-read-ahead")
    pending: deque = deque()
    it, done, ahead = iter(items), False, 0
    try:
        while True:
            while not done and (not pending or (len(pending) <= _SETTINGS.read_ahead
                                                and ahead < _SETTINGS.read_ahead_bytes)):
                item = next(it, _END)
                if item is _END:
                    done = True
                    break
                url, offset, nbytes = where(item)
                ahead += nbytes or 0
                pending.append((item, nbytes or 0, pool.submit(fetch, url, offset, nbytes)))
            if not pending:
                return
            item, nbytes, future = pending.popleft()
            ahead -= nbytes
            data = future.result()  # a fault in the background is raised here, at its range
            STATS.hold(-len(data))
            yield item, data
    finally:
        for _, _, future in pending:
            if not future.cancel() and future.done() and future.exception() is None:
                STATS.hold(-len(future.result()))
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()


class RangeFile:
    """A read-only file over the bytes of ``[offset, offset + len(data))`` of a file of ``size`` bytes:
    ``seek``/``read`` take the file's own positions (what a tar parser expects)."""

    def __init__(self, data: bytes, offset: int, size: int | None = None) -> None:
        self._data, self._offset, self._pos = memoryview(data), offset, offset
        self.size = size if size is not None else offset + len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self.size + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        start = self._pos - self._offset
        if start < 0:
            raise ValueError(f"position {self._pos} is before the fetched range (offset {self._offset})")
        end = len(self._data) if n < 0 else min(len(self._data), start + n)
        out = bytes(self._data[start:end])
        self._pos += len(out)
        return out

    def close(self) -> None:
        self._data.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# zarr


def zarr_store(url: str) -> Any:
    """A read-only zarr store over ``url`` (:class:`PrefetchStore` around zarr's fsspec store)."""
    from zarr.storage import FsspecStore

    options = _fs_options(url.split("://", 1)[0])
    inner_store = FsspecStore.from_url(url, storage_options=options or None, read_only=True)
    _quiet(inner_store.fs)
    cls = globals().get("PrefetchStore") or __getattr__("PrefetchStore")
    return cls(inner_store, url)


def _prefetch_store_class() -> type:
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.storage import WrapperStore

    class _PrefetchStore(WrapperStore):
        """Serves chunk reads from byte ranges fetched ahead (:meth:`prefetch`), and shard indexes
        from a per-file memory (the files of a finished store never change); anything else goes to
        the wrapped store with retries. Listing is never needed to read."""

        def __init__(self, store: Any, url: str = "") -> None:
            super().__init__(store)
            self.url = url
            self._ranges: dict[str, dict[tuple[int, int], bytes]] = {}
            self._tails: dict[tuple[str, int], bytes] = {}

        def _with_store(self, store: Any) -> Any:
            return type(self)(store, self.url)

        def forget(self) -> None:
            """Drop the prefetched chunk ranges (after a batch): memory stays bounded by one batch."""
            self._ranges.clear()

        async def prefetch(self, wanted: dict[str, list[tuple[int, int]]]) -> None:
            """Fetch the ``[start, end)`` ranges of each key (a file under the store), coalesced into
            requests of at most ``block_bytes``, concurrently; each block retried on a network fault."""
            sem = asyncio.Semaphore(max(1, _SETTINGS.concurrency))

            async def one(key: str, start: int, end: int) -> tuple[str, int, int, bytes]:
                async def get() -> bytes:
                    async with sem:
                        buf = await self._store.get(key, _prototype(), RangeByteRequest(start, end))
                    if buf is None:
                        raise FileNotFoundError(f"{self.url}/{key}")
                    data = buf.to_bytes()
                    STATS.add(1, len(data))
                    if len(data) != end - start:
                        raise _Truncated(f"bytes [{start}, {end}): {len(data)} bytes came back")
                    return data

                return key, start, end, await retrying_async(get, f"{self.url}/{key}")

            jobs = [one(key, s, e) for key, ranges in wanted.items()
                    for s, e in coalesce(ranges, _SETTINGS.block_bytes, _SETTINGS.gap_bytes)]
            for key, start, end, data in await asyncio.gather(*jobs):
                self._ranges.setdefault(key, {})[(start, end)] = data

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if isinstance(byte_range, RangeByteRequest) and key in self._ranges:
                for (s, e), data in self._ranges[key].items():
                    if s <= byte_range.start and byte_range.end <= e:
                        return prototype.buffer.from_bytes(data[byte_range.start - s : byte_range.end - s])
            if isinstance(byte_range, SuffixByteRequest) and (key, byte_range.suffix) in self._tails:
                return prototype.buffer.from_bytes(self._tails[(key, byte_range.suffix)])

            async def get() -> Any:
                buf = await self._store.get(key, prototype, byte_range)
                if buf is not None:
                    STATS.add(1, len(buf))
                return buf

            buf = await retrying_async(get, f"{self.url}/{key}")
            if isinstance(byte_range, SuffixByteRequest) and buf is not None:
                self._tails[(key, byte_range.suffix)] = buf.to_bytes()
            return buf

    return _PrefetchStore


def _prototype() -> Any:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


def __getattr__(name: str) -> Any:
    if name == "PrefetchStore":  # built on first use: importing zarr is not free
        cls = _prefetch_store_class()
        globals()["PrefetchStore"] = cls
        return cls
    raise AttributeError(name)
