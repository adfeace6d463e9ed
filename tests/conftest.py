"""Shared fixtures. Everything is generated locally: tiny open_clip configs, PyAV-encoded videos."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when tests spawn subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and with other jobs on a 2-core machine two
    threads wait on each other at every op (steps ~10x slower); one thread keeps the timing stable.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory: pytest.TempPathFactory):
    """The 8-clip moving-shapes corpus (seed 200) that the input-path, VideoMAE and basis tests train and
    cache on, written once per session; returns its manifest."""
    from umt_distill.testing.corpora import write_shapes_corpus

    return write_shapes_corpus(tmp_path_factory.mktemp("shapes8"), 8, seed=200)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, shapes_corpus):
    """A factory of stores cached from :func:`shapes_corpus` with the tiny teacher (``stage1/tiny``, or
    ``stage1/tiny_wds`` for the wds layout): ``tiny_store(layout, codec, mode)`` builds each combination
    once per session and returns its folder. Tests that damage a store copy it first."""
    from umt_distill.cache.pipeline import cache_teacher
    from umt_distill.config import load_recipe

    built: dict[tuple[str, str, str], object] = {}
    root = tmp_path_factory.mktemp("tiny_stores")

    def make(layout: str = "zarr", codec: str = "fp16", mode: str = "full"):
        key = (layout, codec, mode)
        if key not in built:
            store = root / "-".join(key)
            recipe = "stage1/tiny_wds" if layout == "wds" else "stage1/tiny"
            cache_teacher(load_recipe(recipe, [f"corpus.source={shapes_corpus}", f"cache.store={store}",
                                               f"cache.codec={codec}", f"cache.mode={mode}"]), progress=False)
            built[key] = store
        return built[key]

    return make


@pytest.fixture(scope="session")
def _s3_server_session():
    """moto's S3 server, started once per session (``umt_distill.testing.servers``)."""
    from umt_distill.testing.servers import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_server(_s3_server_session, monkeypatch: pytest.MonkeyPatch):
    """The session's S3 server, with this test's environment pointing a client at it (``AWS_ENDPOINT_URL``,
    keys, region): ``s3_server.url("prefix")`` is an ``s3://`` URL a reader opens with no flag."""
    for key, value in _s3_server_session.env().items():
        monkeypatch.setenv(key, value)
    return _s3_server_session


@pytest.fixture
def http_server():
    """A factory: ``http_server(folder, listings=True)`` serves a folder on 127.0.0.1 with Range and a
    request log; every server started is stopped after the test."""
    from umt_distill.testing.servers import start_http_server

    started = []

    def start(folder, listings: bool = True):
        started.append(start_http_server(folder, listings))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fault_proxy():
    """A factory: ``fault_proxy(endpoint)`` puts a fault-injecting proxy in front of a server's endpoint
    (``umt_distill.testing.servers.FaultProxy``); stopped after the test."""
    from umt_distill.testing.servers import FaultProxy

    started = []

    def start(endpoint: str):
        started.append(FaultProxy(endpoint))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
