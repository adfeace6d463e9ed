"""Writing a store to object storage: ``cache-teacher ... cache.store=s3://bucket/prefix``.

The writer runs on a local *staging* folder that mirrors the store's small files (spec, corpus rows,
basis, zarr metadata, sidecars, index, failures) and holds only the shards in flight; every shard is
uploaded whole from it. S3 has no rename, but a PUT (a multipart upload once it completes) is atomic per
object, so the order of the uploads is what keeps a reader safe:

1. before any shard: ``corpus.jsonl``, ``basis.npy``, ``captions/``, the zarr group metadata, then
   ``spec.json`` (a prefix with shards but no spec never exists, so a resumed run recognises its store);
2. each shard: its data (a zarr shard's objects, or the ``.tar``; a file above twice
   :data:`UPLOAD_PART_BYTES` as a multipart upload), its caption scores, then its sidecar
   ``shards/<name>.json``; the shard's local copy is then deleted. A shard counts as finished when its
   sidecar object exists, exactly as on disk, so a killed upload is redone by the next run;
3. at the end: changed sidecars (``--retry-failed`` refreshes reasons), ``failures.jsonl``,
   ``index.json`` (naming only shards whose data and sidecar are uploaded), ``spec.json`` last.

A re-run downloads the small files into a fresh staging folder and decides the work as on disk
(``repair.plan_shard_work``), asking the bucket for the shards' sizes (:meth:`RemoteStore.shard_damage`;
``--deep`` downloads each shard to read it) and deleting a discarded shard's objects sidecar first.

Under torchrun every rank has its own staging folder and uploads its own shards; rank 0 takes the
lease, creates or checks the store and uploads its small files, which the other ranks then fetch
(:func:`sync_small_files`), and fetches every rank's sidecars before it writes the index
(:func:`collect_shards`). The staging folder is made in ``$TMPDIR`` and needs room for the shards in
flight (one or two per process); a killed writer's is deleted by the next one (:func:`clear_dead_stagings`).

One writer per store: the store's lease object ``<prefix>/.lock`` (:class:`RemoteLease`), created with
a conditional PUT (``If-None-Match: *``), renewed by its holder every third of its lifetime with
``If-Match`` on its own ETag, and taken over (again with ``If-Match``) once the server's clock says it
has not been renewed for its lifetime, or at once when its holder is a dead process on this host. A
service that ignores or refuses conditional writes is detected when the lease is taken and the run is
refused, unless ``UMT_DISTILL_UNSAFE_LEASE=1`` says the user keeps writers apart.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from umt_distill import storage
from umt_distill.cache.captions import CAPTIONS_DIR, scores_name
from umt_distill.cache.lock import LOCK_FILE, StoreLockedError, describe_holder
from umt_distill.cache.spec import CORPUS_FILE, SPEC_FILE, now_iso
from umt_distill.cache.store_folder import CacheError
from umt_distill.training import distributed as du

__all__ = [
    "LEASE_SECONDS_ENV",
    "UNSAFE_LEASE_ENV",
    "RemoteLease",
    "RemoteStore",
    "RemoteWriteError",
    "collect_shards",
    "is_url",
    "open_remote_store",
    "publish_shard",
    "push_small_files",
    "staged_remote",
    "sync_small_files",
]

#: The lease's lifetime in seconds (default 60): a holder that stops renewing it (killed, cut off) is
#: taken over this long after its last renewal.
LEASE_SECONDS_ENV = "UMT_DISTILL_LEASE_SECONDS"
#: ``1``: on a service without conditional writes, write anyway (the user keeps writers apart).
UNSAFE_LEASE_ENV = "UMT_DISTILL_UNSAFE_LEASE"
DEFAULT_LEASE_SECONDS = 60
#: Multipart part size of shard uploads: a file below twice this is one PUT, a larger one a multipart
#: upload (the object appears only when the upload completes, so it is atomic too).
UPLOAD_PART_BYTES = 64 * 2**20
WRITABLE_PROTOCOLS = ("s3", "s3a")
_INDEX_FILE, _FAILURES_FILE, _SHARDS_DIR = "index.json", "failures.jsonl", "shards"
_SUFFIXES = (".zarr", ".tar")


class RemoteWriteError(CacheError):
    """A store on object storage cannot be written (read-only protocol, unsafe service, lost lease ...)."""


def is_url(store: str | Path) -> bool:
    """Whether a store is given as a URL (``s3://``, ``http://`` ...) rather than a local folder."""
    return "://" in str(store)


# --------------------------------------------------------------------------------------------------
# the file system of a URL


def filesystem(url: str):
    """``(fs, path)`` of a store URL (``storage.filesystem``: endpoint and credentials from the standard
    places, the client's own retries off). Its listings may be cached: every listing here refreshes."""
    fs, path = storage.filesystem(url)
    return fs, path.rstrip("/")


def check_writable_url(url: str) -> None:
    """Refuse, in one line, a store URL this writer cannot write."""
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        raise RemoteWriteError(f"cache.store={url}: an HTTP store is read-only (HTTP has no upload); cache to a "
                               "local folder or s3://bucket/prefix and serve that folder over HTTP")
    if protocol not in WRITABLE_PROTOCOLS:
        raise RemoteWriteError(f"cache.store={url}: writing a store is supported on a local folder and on s3:// "
                               f"(AWS S3 or an S3-compatible endpoint), not on {protocol}://; cache locally and "
                               "copy the folder there")


def _s3_error(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an exception s3fs raised (``("", 0)`` if none)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return (str(response.get("Error", {}).get("Code", "")),
                    int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
    return ("", 0)


def _conflict(e: BaseException) -> bool:
    """A conditional write lost: the object exists (412), or a concurrent conditional write won (409)."""
    code, status = _s3_error(e)
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict") \
        or status in (409, 412)


def _unsupported(e: BaseException) -> bool:
    code, status = _s3_error(e)
    return code in ("NotImplemented", "NotImplementedError") or status == 501


# --------------------------------------------------------------------------------------------------
# the lease


class RemoteLease:
    """The exclusive write lease of a store on object storage (``<prefix>/.lock``); see the module docstring.

    The same interface as :class:`umt_distill.cache.lock.StoreLock` (``acquire`` / ``release``, a
    context manager). ``lost`` turns true if a renewal finds the lease taken over (the holder was
    presumed dead); the writer then stops before its next upload.
    """

    def __init__(self, url: str, purpose: str, fs=None, seconds: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = (fs, filesystem(url)[1]) if fs is not None else filesystem(url)
        self.bucket, _, prefix = root.partition("/")
        self.key = f"{prefix}/{LOCK_FILE}" if prefix else LOCK_FILE
        self.purpose = purpose
        self.seconds = int(seconds if seconds is not None else os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS))
        self.token = uuid.uuid4().hex
        self.started = now_iso()
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewing = threading.Lock()  # the renewal thread and check() before an upload
        self._renewed = time.monotonic()  # when the last write of the lease that succeeded was sent

    def _net(self, fn):
        """``fn()`` with the storage module's bounded retries; then ``NetworkError`` naming the store."""
        return storage.retrying(fn, self.url)

    def _put(self, **conditions) -> dict:
        sent = time.monotonic()
        out = self._net(lambda: self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                **conditions))
        self._renewed = sent
        return out

    def _ours(self) -> bool:
        """Whether the lease object is this run's (a retried conditional write whose first try landed
        fails its condition against itself); updates ``etag`` if so."""
        now = self.holder()
        if now is not None and now[1].get("token") == self.token:
            self.etag = now[0]
            return True
        return False

    # -- what the lease object says

    def _body(self) -> bytes:
        return (json.dumps({"host": socket.gethostname(), "space": _process_space(), "pid": os.getpid(),
                            "started": self.started,
                            "renewed": now_iso(),
                            "purpose": self.purpose, "command": " ".join(sys.argv)[:500],
                            "seconds": self.seconds, "token": self.token}) + "\n").encode()

    def holder(self) -> tuple[str, dict, float] | None:
        """``(etag, holder info, seconds since its last renewal by the server's clock)``, or None."""
        try:
            head = self._net(lambda: self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key))
        except FileNotFoundError:
            return None
        try:
            text = self._net(lambda: self.fs.cat_file(f"{self.bucket}/{self.key}", start=0, end=1 << 16))  # ~300 bytes
        except FileNotFoundError:  # released between the two calls: look again
            return self.holder()
        try:
            info = json.loads(text)
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        server_now = email.utils.parsedate_to_datetime(date) if date else _dt.datetime.now(_dt.UTC)
        age = (server_now - head["LastModified"]).total_seconds()
        return head["ETag"], info, age

    def _stale(self, info: dict, age: float) -> bool:
        seconds = info.get("seconds")
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            seconds = DEFAULT_LEASE_SECONDS
        if age > seconds:
            return True
        # A dead process is only provably dead in the same process namespace of the same boot: two
        # containers sharing a host name (``--network host``) must wait for the lifetime like any other.
        space = _process_space()
        return space is not None and info.get("space") == space and info.get("host") == socket.gethostname() \
            and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])

    # -- taking, renewing, giving back

    def acquire(self) -> RemoteLease:
        """Take the lease or raise :class:`StoreLockedError` naming the holder (or
        :class:`RemoteWriteError` when the service cannot keep two writers apart)."""
        current = self.holder()
        try:
            if current is None:
                self.etag = self._put(IfNoneMatch="*")["ETag"]
            else:
                etag, info, age = current
                if not self._stale(info, age):
                    raise self._refusal(info, age)
                # a dead holder's lease: replace exactly that object; a concurrent taker's If-Match fails
                self.etag = self._put(IfMatch=etag)["ETag"]
        except StoreLockedError:
            raise
        except Exception as e:
            if _unsupported(e):
                return self._without_conditions()
            if not _conflict(e):
                raise
            if not self._ours():
                now = self.holder()
                raise self._refusal(now[1] if now else {}, now[2] if now else None) from None
        if not self._conditions_hold():
            return self._without_conditions()
        self._start_renewing()
        return self

    def _conditions_hold(self) -> bool:
        """Probe that the service honours ``If-None-Match``: a second conditional create of our own lease
        must fail. A service that ignores the header overwrites it (with our own lease) and says 200."""
        try:
            out = self._put(IfNoneMatch="*")
        except Exception as e:
            if _conflict(e):
                return True
            if _unsupported(e):
                return False
            raise
        self.etag = out["ETag"]
        return False

    def _without_conditions(self) -> RemoteLease:
        if os.environ.get(UNSAFE_LEASE_ENV) != "1":
            with contextlib.suppress(Exception):
                if self.etag is not None:
                    self._net(lambda: self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key))
            self.etag = None
            raise RemoteWriteError(
                f"{self.url}: the storage service does not honour conditional writes (If-None-Match), so two "
                f"writers of this store could not be kept apart; use a service that does (AWS S3, a recent "
                f"MinIO), or make sure only one writer runs and set {UNSAFE_LEASE_ENV}=1")
        self.etag = self._put().get("ETag")
        self._start_renewing(conditional=False)
        return self

    def _refusal(self, info: dict, age: float | None) -> StoreLockedError:
        seconds = info.get("seconds", DEFAULT_LEASE_SECONDS)
        renewed = f"its lease {LOCK_FILE} renewed {age:.0f} s ago" if age is not None else f"its lease {LOCK_FILE}"
        return StoreLockedError(f"{self.url} is being written by another run ({describe_holder(json.dumps(info))}; "
                                f"{renewed}, taken over after {seconds} s without renewal); wait for it to finish, "
                                "or use another store")

    def _start_renewing(self, conditional: bool = True) -> None:
        self._conditional = conditional
        self._thread = threading.Thread(target=self._renew_loop, name="store-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.seconds / 3)):
            self.renew()

    def renew(self) -> None:
        """Rewrite the lease (its server time is its last sign of life); a lost ``If-Match`` means
        another run took it over, and this run must stop writing."""
        with self._renewing:
            if self.lost:
                return
            try:
                self.etag = self._put(**({"IfMatch": self.etag} if self._conditional and self.etag else {}))["ETag"]
            except Exception as e:  # noqa: BLE001 - a renewal thread must not die
                if (_conflict(e) or isinstance(e, FileNotFoundError)) and not self._safe_ours():
                    self.lost = True
                # a network error: try again at the next period; the lease lives for ``seconds``

    def _safe_ours(self) -> bool:
        try:
            return self._ours()
        except Exception:  # noqa: BLE001 - unreachable now: decided at the next renewal
            return True

    def check(self) -> None:
        """Before each upload: renew the lease now if half its lifetime has passed since the last renewal
        (this process may have been paused, and the renewal thread not have run yet); raise
        :class:`RemoteWriteError` if it was taken over, or could not be renewed for its whole lifetime."""
        if not self.lost and time.monotonic() - self._renewed > self.seconds / 2:
            self.renew()
        if self.lost:
            raise RemoteWriteError(f"{self.url}: this run's lease {LOCK_FILE} was taken over by another run (it "
                                   "was not renewed in time); stopping before writing more — re-run to resume")
        if time.monotonic() - self._renewed > self.seconds:
            raise RemoteWriteError(f"{self.url}: this run could not renew its lease {LOCK_FILE} for more than its "
                                   f"{self.seconds} s lifetime (the network?), so another run may hold the store "
                                   "now; stopping before writing more — re-run to resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.etag is not None and not self.lost:
            with contextlib.suppress(Exception):  # not ours any more, or unreachable: it expires by itself
                kwargs = {"IfMatch": self.etag} if getattr(self, "_conditional", True) else {}
                self._net(lambda: self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, **kwargs))
        self.etag = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _process_space() -> str | None:
    """This machine's boot and this process's PID namespace (Linux), or None where unknown: the pids
    of a lease are comparable with ours only within both."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# the staging folder and its uploads


_STAGING_PREFIX = "umt-distill-staging-"


def _staging_prefix(pid: int) -> str:
    """``umt-distill-staging-<space>-<pid>-``: a staging folder names the boot and PID namespace
    (hashed) and the process that made it, so a later run can tell a killed writer's folder."""
    space = _process_space()
    tag = hashlib.sha256(space.encode()).hexdigest()[:10] if space is not None else "unknown"
    return f"{_STAGING_PREFIX}{tag}-{pid}-"


def clear_dead_stagings(parent: Path) -> list[Path]:
    """Delete the staging folders under ``parent`` left by killed writers (each can hold a shard or
    two): those made by a process of this boot and PID namespace that is gone. Returns them."""
    mine = _staging_prefix(0)[: -len("0-")]  # umt-distill-staging-<space>-
    if _process_space() is None:
        return []
    cleared = []
    for folder in parent.glob(f"{mine}*"):
        pid = folder.name[len(mine):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            cleared.append(folder)
    return cleared


_OPEN: dict[str, RemoteStore] = {}  # staging folder -> the store it mirrors, for this process's writers


def staged_remote(folder: str | Path) -> RemoteStore | None:
    """The object-storage store whose staging folder is ``folder`` (a store root), or None (a local store)."""
    return _OPEN.get(str(Path(folder))) if _OPEN else None


def open_remote_store(url: str, env: du.DistEnv, purpose: str, settings=None) -> RemoteStore:
    """``cache-teacher`` into ``url``: every rank gets a staging folder; rank 0 takes the store's lease
    and downloads its small files, and every rank learns whether it did (the other ranks fetch them
    once rank 0 has created or checked the store: :func:`sync_small_files`). Errors are
    :class:`CacheError` in one line, on every rank. Release ``.lease`` (rank 0) and ``close()`` it.

    ``settings``: the recipe's ``storage:`` section (retries and backoff of every request).
    """
    check_writable_url(url)
    if settings is not None:
        storage.configure_from(settings)
    remote = RemoteStore(url)
    refusal = None
    if env.is_main:
        try:
            remote.take(purpose)
        except (StoreLockedError, CacheError) as e:
            refusal = str(e)
        except OSError as e:  # unreachable endpoint, no bucket, no permission: before any work
            refusal = f"cannot write the store {url}: {e.strerror or e}"
        except Exception as e:  # storage.NetworkError after its retries, or a bug: the other ranks stop too
            refusal = str(e)
            if env.world_size == 1:
                remote.close()
                raise
    refusal = du.broadcast_object(refusal)
    if refusal is not None:
        remote.close()
        raise CacheError(refusal if env.is_main else f"rank {env.rank} stops: rank 0 did not get the store {url} "
                         "(its message says why)")
    return remote


def sync_small_files(root: str | Path, env: du.DistEnv) -> None:
    """Once rank 0 has created or checked the store (spec, rows, basis, captions) in its staging folder:
    it uploads them, and the other ranks download them into theirs. A local store: nothing."""
    remote = staged_remote(root)
    if remote is None:
        return
    if env.is_main:
        remote.push_changed()
    du.barrier()
    if not env.is_main:
        remote.pull()


def collect_shards(root: str | Path, env: du.DistEnv) -> None:
    """After every rank's shards: each rank uploads what it changed besides its shards (sidecars whose
    failure reasons ``--retry-failed`` refreshed); then, past a barrier, rank 0 fetches the sidecars
    the other ranks uploaded, so ``finalize_store`` sees every shard. A local store: the barrier only."""
    remote = staged_remote(root)
    if remote is not None:
        remote.push_changed()
    du.barrier()
    if remote is not None and env.is_main and env.world_size > 1:
        remote.pull(sidecars=True)


def push_small_files(root: str | Path) -> None:
    """If ``root`` is the staging folder of a store on object storage, upload its new or changed small
    files (spec last); a local store: nothing."""
    remote = staged_remote(root)
    if remote is not None:
        remote.push_changed()


def publish_shard(shards_dir: str | Path, sidecar: dict) -> None:
    """After a shard's data and sidecar are in ``shards_dir``: upload them if the store is remote."""
    remote = staged_remote(Path(shards_dir).parent)
    if remote is not None:
        remote.publish_shard(sidecar)


class RemoteStore:
    """A store on object storage written through a local staging folder (see the module docstring).

    Args:
        url: ``s3://bucket/prefix``.
        staging_parent: Where the staging folder is made (default: the system's temporary folder;
            it holds the small files and the shards in flight, and is deleted by :meth:`close`).
    """

    def __init__(self, url: str, staging_parent: str | Path | None = None) -> None:
        check_writable_url(url)
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        clear_dead_stagings(Path(staging_parent or tempfile.gettempdir()))
        self.staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(os.getpid()), dir=staging_parent))
        self.lease: RemoteLease | None = None
        self._sent: dict[str, tuple[int, int]] = {}  # staging-relative path -> _stamp when sent
        self._sizes: dict[str, int] = {}  # shard data name (shard-000001.tar) -> bytes in the bucket
        _OPEN[str(self.staging)] = self

    def _net(self, fn):
        """``fn()`` with the storage module's bounded retries; then ``NetworkError`` naming the store."""
        return storage.retrying(fn, self.url)

    # -- paths

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _rel(self, remote_path: str) -> str:
        return remote_path[len(self.root) + 1:]

    # -- taking the store

    def take(self, purpose: str) -> RemoteLease:
        """Refuse a prefix that holds something other than a store, take the lease, then download the
        store's small files into the staging folder. Returns the lease (release it when done)."""
        self.refuse_foreign()
        self.lease = RemoteLease(self.url, purpose, fs=self.fs).acquire()
        try:
            self.refuse_foreign()
            self.pull()
        except BaseException:
            self.lease.release()
            raise
        return self.lease

    def _listing(self, path: str) -> list[dict]:
        try:
            return self._net(lambda: self.fs.ls(path, detail=True, refresh=True))
        except FileNotFoundError:
            return []

    def refuse_foreign(self) -> None:
        """As ``store_folder.refuse_foreign_folder``: a prefix without spec.json holding other objects is
        not a store; nothing is downloaded from it or written into it."""
        names = {self._rel(e["name"].rstrip("/")) for e in self._listing(self.root)}
        if SPEC_FILE in names:
            return
        foreign = sorted(n for n in names if n not in (LOCK_FILE, CORPUS_FILE) and not n.startswith(".tmp-"))
        if foreign:
            raise RemoteWriteError(f"{self.url} is not empty ({foreign[0]} ...) and has no spec.json: it is not a "
                                   "cache store; refusing to write into it — use another cache.store")

    def pull(self, sidecars: bool = False) -> None:
        """Download the store's small files (everything but shard data and the lease) that the staging
        folder does not hold yet, and note the sizes of the shards' data in the bucket. (A file already in
        staging is this run's: the same bytes as the bucket's, or newer and uploaded later.) ``sidecars``:
        also download every sidecar again (rank 0, before the index: other ranks may have redone shards)."""
        self.fs.invalidate_cache(self.root)
        files = self._net(lambda: self.fs.find(self.root, detail=True))
        wanted: list[tuple[str, Path]] = []
        sizes: dict[str, int] = {}
        for path, entry in files.items():
            rel = self._rel(path)
            if entry.get("type") == "directory" or rel == LOCK_FILE or rel.startswith(".tmp-"):
                continue
            parts = rel.split("/")
            if parts[0] == _SHARDS_DIR and len(parts) >= 2 and parts[1].endswith(_SUFFIXES):
                sizes[parts[1]] = sizes.get(parts[1], 0) + int(entry.get("size") or 0)
                continue
            if not (self.staging / rel).exists() or (sidecars and _push_rank(rel) == 1):
                wanted.append((path, self.staging / rel))
        self._sizes = sizes
        for _, local in wanted:
            local.parent.mkdir(parents=True, exist_ok=True)
        if wanted:  # one call: the files (a sidecar per shard) are fetched concurrently
            self._net(lambda: self.fs.get([p for p, _ in wanted], [str(q) for _, q in wanted]))
        for _, local in wanted:
            self._sent[local.relative_to(self.staging).as_posix()] = _stamp(local)

    # -- uploads

    def _upload(self, local: Path, rel: str) -> None:
        self._net(lambda: self.fs.put_file(str(local), self.remote(rel), chunksize=UPLOAD_PART_BYTES))

    def _changed(self) -> list[tuple[str, Path]]:
        """Mirrored files of the staging folder that are new or changed since pulled or pushed, in the
        order a reader relies on: other files, then sidecars, ``failures.jsonl``, ``index.json``,
        ``spec.json`` last."""
        changed = []
        for local in sorted(self.staging.rglob("*")):
            rel = local.relative_to(self.staging).as_posix()
            if local.is_file() and not _not_mirrored(rel) and self._sent.get(rel) != _stamp(local):
                changed.append((rel, local))
        changed.sort(key=lambda c: (_push_rank(c[0]), c[0]))
        return changed

    def _send(self, items: list[tuple[str, Path]]) -> None:
        for rel, local in items:
            stamp = _stamp(local)
            self._upload(local, rel)
            self._sent[rel] = stamp

    def push_changed(self) -> list[str]:
        """Upload the staging folder's new or changed small files (:meth:`_changed`'s order). Returns
        their staging-relative paths."""
        if self.lease is not None:
            self.lease.check()
        changed = self._changed()
        self._send(changed)
        return [rel for rel, _ in changed]

    def publish_shard(self, sidecar: dict) -> None:
        """Upload one closed shard: its data objects, the small files written with it (its caption frame
        scores), then its sidecar, which marks it finished; then drop the local data. (Other small files
        go up before the first shard and at the end: :meth:`push_changed`.)"""
        if self.lease is not None:
            self.lease.check()
        name = sidecar["name"]
        shards = self.staging / _SHARDS_DIR
        data = _data_paths(shards, name)
        for path in data:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            if len(files) == 1:
                self._upload(files[0], files[0].relative_to(self.staging).as_posix())
            elif files:
                lpaths = [str(f) for f in files]
                rpaths = [self.remote(f.relative_to(self.staging).as_posix()) for f in files]
                self._net(lambda: self.fs.put(lpaths, rpaths, chunksize=UPLOAD_PART_BYTES))  # noqa: B023
            self._sizes[path.name] = sum(f.stat().st_size for f in files)
        extras = [f"{CAPTIONS_DIR}/{scores_name(name)}"]  # written with the shard, before its sidecar
        self._send([(rel, self.staging / rel) for rel in extras if (self.staging / rel).is_file()])
        side = f"{_SHARDS_DIR}/{name}.json"
        self._send([(side, self.staging / side)])
        for path in data:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    # -- what a re-run checks and discards

    def shard_damage(self, shards_dir: Path, layout: str, sidecar: dict, deep: bool, read) -> str | None:
        """``repair.shard_damage`` for a shard in the bucket: data present with the recorded size; with
        ``deep`` the shard is downloaded into staging, read as on disk by ``read`` (``repair.shard_damage``),
        then dropped."""
        if sidecar["num_records"] == 0:
            return None
        data = f"{sidecar['name']}{'.zarr' if layout == 'zarr' else '.tar'}"
        size = self._sizes.get(data)
        if size is None:
            return f"{data} is missing"
        if size != sidecar["nbytes"]:
            return f"{data} has {size} bytes, its sidecar records {sidecar['nbytes']} (truncated or modified)"
        if not deep:
            return None
        remote = self.remote(f"{_SHARDS_DIR}/{data}")
        self.fs.invalidate_cache(remote)
        found = self._net(lambda: self.fs.find(remote, detail=True))
        files = [p for p, e in found.items() if e.get("type") != "directory"]
        local = shards_dir / data
        try:
            for path in files:
                target = self.staging / self._rel(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._net(lambda: self.fs.get_file(path, str(target)))  # noqa: B023 - called at once
            return read(shards_dir, layout, sidecar, True)
        finally:
            if local.is_dir():
                shutil.rmtree(local)
            elif local.exists():
                local.unlink()

    def discard(self, name: str) -> None:
        """Delete shard ``name``'s objects, its sidecar first (a kill then leaves an unfinished shard).
        Only what the bucket held when the lease was taken, or this run uploaded, is asked for."""
        side = f"{_SHARDS_DIR}/{name}.json"
        present = [f"{name}{s}" for s in _SUFFIXES if f"{name}{s}" in self._sizes]
        if side not in self._sent and not present:
            return
        if self.lease is not None:
            self.lease.check()
        with contextlib.suppress(FileNotFoundError):
            self._net(lambda: self.fs.rm_file(self.remote(side)))
        self._sent.pop(side, None)
        for data in present:
            path = self.remote(f"{_SHARDS_DIR}/{data}")
            self.fs.invalidate_cache(path)
            found = self._net(lambda: self.fs.find(path))  # noqa: B023 - called at once
            if found:
                self._net(lambda: self.fs.rm(found))  # noqa: B023
            del self._sizes[data]

    # -- the end

    def close(self) -> None:
        """Forget and delete the staging folder (the lease is released by whoever took it)."""
        _OPEN.pop(str(self.staging), None)
        shutil.rmtree(self.staging, ignore_errors=True)

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """Messages of errors raised inside name the store's URL, not the staging folder."""
        try:
            yield
        except (RuntimeError, ValueError, OSError) as e:
            text = str(e)
            if str(self.staging) not in text:
                raise
            if len(e.args) == 1 and isinstance(e.args[0], str):  # the message itself: keep the error's type
                e.args = (text.replace(str(self.staging), self.url),)
                raise
            raise CacheError(text.replace(str(self.staging), self.url)) from e  # e.g. OSError(errno, text, path)


def _data_paths(shards: Path, name: str) -> list[Path]:
    return [p for p in (shards / f"{name}{s}" for s in _SUFFIXES) if p.exists()]


def _not_mirrored(rel: str) -> bool:
    """Files of the staging folder that never go to the bucket: the local lock, temporaries, shard data."""
    parts = rel.split("/")
    if rel == LOCK_FILE or any(p.startswith(".tmp-") for p in parts):
        return True
    return parts[0] == _SHARDS_DIR and len(parts) >= 2 and parts[1].endswith(_SUFFIXES)


def _push_rank(rel: str) -> int:
    """Upload order of a small file: 0 any other, 1 sidecars, then failures, index, spec."""
    parts = rel.split("/")
    if parts[0] == _SHARDS_DIR and len(parts) == 2 and parts[1].endswith(".json") and parts[1] != "zarr.json":
        return 1
    return {_FAILURES_FILE: 2, _INDEX_FILE: 3, SPEC_FILE: 4}.get(rel, 0)


def _stamp(path: Path) -> tuple[int, int]:
    """What says a staging file changed since it was sent: its size and modification time (every write
    in the store is a new file renamed into place, so a rewrite always changes the time)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns
