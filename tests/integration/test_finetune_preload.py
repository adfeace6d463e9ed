"""``finetune.preload``: training items sampled from videos decoded once equal the items decoded per epoch."""

from __future__ import annotations


import pytest
import torch

from umt_distill.testing.corpora import write_labelled_videos

from umt_distill.config import load_recipe  # noqa: E402
from umt_distill.data.classification import VideoClassificationTrainSet, read_labelled_corpus  # noqa: E402


@pytest.mark.parametrize("sampling", ["sparse", "segment"])
def test_preloaded_items_equal_decoded_items(tmp_path, sampling) -> None:
    manifest = write_labelled_videos(tmp_path, per_class=2, num_frames=12)
    cfg = load_recipe("finetune/tiny", [f"finetune.train_source={manifest}", f"finetune.sampling={sampling}",
                                        "finetune.num_frames=4", "finetune.size=32"])
    rows, labels = read_labelled_corpus(manifest, None, cfg.finetune.num_classes, None)
    plain = VideoClassificationTrainSet(rows, labels, cfg.finetune, seed=3, backend="pyav")
    fast = VideoClassificationTrainSet(rows, labels, cfg.finetune, seed=3, backend="pyav", preload=True)
    assert fast.windows is not None and fast.windows[0][0].shape == (12, 48, 64, 3)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        fast.set_epoch(epoch)
        for i in range(len(rows)):
            a, b = plain[i], fast[i]
            assert a["clip_id"] == b["clip_id"] and torch.equal(a["label"], b["label"])
            assert torch.equal(a["pixels"], b["pixels"]), (epoch, i)
    plain.set_epoch(0)
    assert not torch.equal(plain[0]["pixels"], fast[0]["pixels"])  # fast is at epoch 1: other frames and crops
