"""Every Python code block of cache/FORMAT.md runs against real stores (both layouts, every codec family)
built by the real pipeline, and what the plain-library reading program decodes equals the package's reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from umt_distill.cache.codecs import pack_int4, unpack_int4
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.stores import CacheReader
from umt_distill.config import load_recipe
from umt_distill.testing.corpora import write_shapes_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMAT_MD = Path(__file__).resolve().parents[3] / "cache" / "FORMAT.md"
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "pca4", "pca4i4", "jpca4", "jpca4i4")
STORES = [(layout, codec) for layout in ("zarr", "wds") for codec in CODECS]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", FORMAT_MD.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_shapes_corpus(tmp_path_factory.mktemp("videos"), 2, seed=20)


@pytest.fixture(scope="module")
def stores(corpus, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for layout, codec in STORES:
        store = root / f"{layout}-{codec}"
        cfg = load_recipe("stage1/tiny", [f"corpus.source={corpus}", f"cache.store={store}", f"cache.layout={layout}",
                                          f"cache.codec={codec}", "cache.num_views=1", "cache.basis_clips=2"])
        cache_teacher(cfg, progress=False)
        out[(layout, codec)] = store
    return out


def test_format_md_has_the_blocks_this_test_runs() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert sum("def unpack_int4" in b for b in blocks) == 2  # §6's, and §11's program
    (program,) = [b for b in blocks if "zarr.open_group" in b]
    assert "wds.WebDataset" in program and all(c in program for c in ("bf16", "int4", "pca", "i4"))


@pytest.mark.parametrize("layout, codec", STORES, ids=[f"{layout}-{codec}" for layout, codec in STORES])
def test_every_code_block_runs_on_a_real_store(stores, layout: str, codec: str) -> None:
    root = stores[(layout, codec)]
    reader = CacheReader(root)
    for block in python_blocks():
        scope: dict = {"root": str(root)}
        exec(compile(block, str(FORMAT_MD), "exec"), scope)  # noqa: S102 - the documented examples themselves
        if "tokens" in scope:  # the reading program: the record it read, decoded as the package decodes it
            want = reader.get(scope["clip_id"], scope["view_index"])
            assert scope["tokens"].dtype == np.float32 and scope["tokens"].shape == want.tokens.shape
            np.testing.assert_allclose(scope["tokens"], want.tokens, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(scope["attn"], want.attn)
            np.testing.assert_array_equal(scope["pooled"], want.pooled)
            assert tuple(scope["view"]["frame_indices"]) == want.view.frame_indices
        if "unpack_int4" in scope:  # §6's unpacking equals the codec's
            q = np.random.default_rng(0).integers(-7, 8, (3, 8)).astype(np.int8)
            packed = pack_int4(q)
            np.testing.assert_array_equal(scope["unpack_int4"](packed), unpack_int4(packed))
            np.testing.assert_array_equal(scope["unpack_int4"](packed), q)
