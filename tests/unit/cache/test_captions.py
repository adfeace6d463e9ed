"""Captions at cache time (cache/captions.py): the stored text embeddings and frame scores equal what
CLIP's text tower and the stored ``pooled`` give, FORMAT.md §12's plain reading reads them, damage is
named, and a store cached without captions has none."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from umt_distill.cache.captions import CAPTIONS_DIR, read_caption_table
from umt_distill.cache.pipeline import cache_teacher
from umt_distill.cache.record import StoreDamagedError
from umt_distill.cache.spec import read_spec
from umt_distill.cache.stores import CacheReader, read_index
from umt_distill.config import load_recipe
from umt_distill.testing.media import moving_shapes_video, write_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMAT_MD = Path(__file__).resolve().parents[3] / "cache" / "FORMAT.md"
CAPTIONS = [["a red disc"], ["a green ball", "green thing moving"], ["a blue square"]]


def write_captioned_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caps in enumerate(CAPTIONS):
        write_video(folder / f"v{i}.mp4", moving_shapes_video(6, 48, 64, seed=300 + i), fps=6)
        rows.append({"id": f"v{i}", "path": f"v{i}.mp4", "captions": caps})
    (folder / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "videos.jsonl"


def recipe(corpus: Path, store: Path, *extra: str):
    return load_recipe("stage2/tiny", [f"corpus.source={corpus}", f"cache.store={store}", "cache.codec=fp32",
                                       "cache.clips_per_shard=2", *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("captions")
    corpus = write_captioned_corpus(root / "data")
    cache_teacher(recipe(corpus, root / "store"), progress=False)
    return corpus, root / "store"


def table_of(store: Path):
    spec = read_spec(store)
    return read_caption_table(store, spec, [s["name"] for s in read_index(store)["shards"]])


def test_cache_time_scores_equal_scores_from_the_text_tower(store) -> None:
    _, root = store
    table = table_of(root)
    # CLIP's text tower rebuilt here, independently of the teacher: the tiny config from the teacher's seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model("umt-test-tiny", pretrained=None)
    tokenizer = open_clip.get_tokenizer("umt-test-tiny")
    flat = [c for caps in CAPTIONS for c in caps]
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokenizer(flat)), dim=-1).numpy()
    np.testing.assert_allclose(table.embeddings, text, rtol=0, atol=1e-6)
    reader = CacheReader(root)
    checked = 0
    for (clip_id, view_index) in reader.keys:
        pooled = torch.from_numpy(reader.get(clip_id, view_index).pooled)  # [T, D]
        row = int(clip_id[1:])
        for j, caption in enumerate(CAPTIONS[row]):
            want = F.normalize(pooled, dim=-1) @ torch.from_numpy(text[flat.index(caption)])
            got = table.scores(clip_id, view_index, caption)
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
            checked += 1
    assert checked == 2 * sum(len(c) for c in CAPTIONS)  # K = 2 views


def test_format_md_reading_example_reads_the_caption_fields(store) -> None:
    _, root = store
    blocks = [b for b in re.findall(r"```python\n(.*?)```", FORMAT_MD.read_text(encoding="utf-8"), flags=re.DOTALL)
              if "captions/index.json" in b]
    assert len(blocks) == 1
    scope: dict = {"root": str(root)}
    exec(compile(blocks[0], str(FORMAT_MD), "exec"), scope)  # noqa: S102 - the documented example itself
    table = table_of(root)
    np.testing.assert_array_equal(scope["text_emb"], table.embeddings)
    assert scope["offsets"].tolist() == [0, 1, 3, 4]
    assert [r["captions"] for r in scope["rows"]] == CAPTIONS
    for i, (clip_id, view) in enumerate(zip(scope["score_clip"].tolist(), scope["score_view"].tolist())):
        for j, caption in enumerate(CAPTIONS[int(clip_id[1:])]):
            np.testing.assert_array_equal(scope["frame_scores"][i, :, j], table.scores(clip_id, view, caption))
        assert np.isnan(scope["frame_scores"][i, :, len(CAPTIONS[int(clip_id[1:])]):]).all()


def test_a_modified_caption_file_is_named(store, tmp_path) -> None:
    _, root = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    path = copy / CAPTIONS_DIR / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match="embeddings.npy"):
        table_of(copy)


def test_a_store_cached_without_captions_has_none_and_resuming_keeps_them(store, tmp_path) -> None:
    corpus, root = store
    plain = tmp_path / "plain"
    cache_teacher(recipe(corpus, plain, "frame_select.cache_captions=false"), progress=False)
    assert "captions" not in read_spec(plain) and not (plain / CAPTIONS_DIR).exists()
    assert table_of(plain) is None
    before = {p.name: p.read_bytes() for p in (root / CAPTIONS_DIR).iterdir()}
    cache_teacher(recipe(corpus, root), progress=False)  # a re-run: nothing to do, captions kept as they are
    assert {p.name: p.read_bytes() for p in (root / CAPTIONS_DIR).iterdir()} == before


def test_cached_and_online_text_guided_selection_agree(store) -> None:
    """The loop's scores from the store equal those the online teacher computes from the same view pixels,
    and so do the frames they keep."""
    from torch.utils.data import default_collate

    from umt_distill.cache.captions import OnlineCaptions
    from umt_distill.cache.datasets import CachedViewDataset
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.frame_select import topk_frames
    from umt_distill.stages.stage2_parts import FrameSelection
    from umt_distill.teachers.build import build_teacher

    corpus, root = store
    cfg = recipe(corpus, root)
    rows = read_corpus(corpus)
    dataset = CachedViewDataset(root, cfg, {r.id: r for r in rows})
    batch = default_collate(dataset.__getitems__(list(range(len(dataset)))))
    batch["caption"] = [CAPTIONS[int(c[1:])][-1] for c in batch["clip_id"]]
    teacher = build_teacher(cfg, torch.device("cpu"))
    cached = FrameSelection("text_guided", 2, False, 16, table_of(root), None)
    online = FrameSelection("text_guided", 2, False, 16, OnlineCaptions(rows, teacher), None)
    a = cached.scores(batch, batch["pixels"], None, torch.device("cpu"))
    b = online.scores(batch, batch["pixels"], teacher, torch.device("cpu"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(topk_frames(a, 2), topk_frames(b, 2))
