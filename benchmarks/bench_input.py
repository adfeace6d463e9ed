"""Input pipeline: can decoding and target reads keep up with the student?

1. Decode: frames/s of decord vs PyAV vs torchcodec for UMT's sparse sampling (T frames, one per segment, the
   ``umt_train`` view policy's indices) through a DataLoader with 1 and N workers, one decoder
   thread each. Decode only: crop/resize are not included.
2. Target reads: records (clip-views)/s and MB/s of a Zarr store read in random order
   (``CacheReader.get``) vs a WebDataset store streamed in order (``wds_records``), with 0/1/2
   DataLoader workers, page cache evicted before every pass (cold reads). Records arrive in the
   training process as tensors, as the training datasets deliver them.

``run.py`` compares both with the clips/s the student consumes at each size (from the step benchmark).
Standalone:

    .venv/bin/python -m benchmarks.bench_input --clips 24 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from benchmarks.common import evict_page_cache, log, store_data_bytes


DECODE_BACKENDS = ("decord", "pyav", "torchcodec")  # the decode rows, in report order


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # N workers on N cores: no oversubscription


# --------------------------------------------------------------------------------------------------
# decode


class SparseDecode(Dataset):
    """Item i: the ``umt_train`` view's T frame indices of clip i, decoded; returns the frame count."""

    def __init__(self, rows: list, backend: str, num_frames: int, seed: int = 0) -> None:
        self.rows, self.backend, self.num_frames, self.seed = rows, backend, num_frames, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, str]:
        from umt_distill.data.video import open_video
        from umt_distill.data.views import sample_view

        row = self.rows[i]
        with open_video(row.path, backend=self.backend, threads=1) as video:
            view = sample_view("umt_train", video.info, self.num_frames, 224, self.seed, row.id, 0)
            frames = video.get_frames(list(view.frame_indices))  # [T, H, W, 3]
            # decord and torchcodec fall back to PyAV where not known to be frame-exact: say which ran.
            return int(frames.shape[0]), getattr(video, "decoder", self.backend)


def decode_throughput(manifest: str, backend: str, workers: int, num_frames: int = 8) -> dict[str, Any]:
    """Frames/s of one backend with ``workers`` DataLoader workers over every clip of ``manifest``.

    The time includes starting the workers (a fork: well under a second) and is taken over all clips.
    The backend's library is imported first, in this process, as a training loop should do before its
    workers fork (torchcodec's import takes seconds: it imports ``torch._dynamo``).
    """
    from umt_distill.data.corpus import read_corpus
    from umt_distill.data.video import preload_video_backend

    rows = read_corpus(manifest)
    preload_video_backend(backend)
    loader = DataLoader(SparseDecode(rows, backend, num_frames), batch_size=None, shuffle=False, num_workers=workers,
                        worker_init_fn=_one_thread if workers else None, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    items = list(loader)
    seconds = time.perf_counter() - t
    frames = sum(n for n, _ in items)
    return {"backend": backend, "decoders_used": sorted({d for _, d in items}), "workers": workers, "clips": len(rows),
            "frames": frames, "seconds": seconds, "frames_per_s": frames / seconds, "clips_per_s": len(rows) / seconds}


# --------------------------------------------------------------------------------------------------
# target reads


def _as_tensors(record) -> dict[str, torch.Tensor]:
    return {"tokens": torch.from_numpy(np.ascontiguousarray(record.tokens)),
            "attn": torch.from_numpy(np.ascontiguousarray(record.attn))}


class RandomRecords(Dataset):
    """Zarr random access: item i = record ``keys[i]``, read through a per-worker :class:`CacheReader`."""

    def __init__(self, root: str, keys: list[tuple[str, int]]) -> None:
        self.root, self.keys, self.reader = root, keys, None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from umt_distill.cache.stores import CacheReader

        if self.reader is None:
            self.reader = CacheReader(self.root)
        return _as_tensors(self.reader.get(*self.keys[i]))


class StreamRecords(IterableDataset):
    """WebDataset streaming in store order, split across workers by shard."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __iter__(self):
        from umt_distill.cache.stores import wds_records

        for record in wds_records(self.root, shuffle=0, split_by_node=False, split_by_worker=True):
            yield _as_tensors(record)


def read_throughput(root: str, layout: str, workers: int, seed: int = 0) -> dict[str, Any]:
    """Records/s and MB/s (on-disk and decoded float32) of one cold pass over the whole store."""
    from umt_distill.cache.stores import CacheReader

    reader = CacheReader(root)
    if layout == "zarr":
        order = torch.randperm(len(reader.keys), generator=torch.Generator().manual_seed(seed)).tolist()
        dataset: Dataset | IterableDataset = RandomRecords(root, [reader.keys[i] for i in order])
    else:
        dataset = StreamRecords(root)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_one_thread if workers else None,
                        prefetch_factor=4 if workers else None)
    disk = store_data_bytes(Path(root))
    evict_page_cache(Path(root))
    n, decoded, t = 0, 0, time.perf_counter()
    for item in loader:
        n += 1
        decoded += sum(x.numel() * x.element_size() for x in item.values())
    seconds = time.perf_counter() - t
    if n != len(reader.keys):
        raise RuntimeError(f"{root}: read {n} records, the index lists {len(reader.keys)}")
    return {"layout": layout, "access": "random" if layout == "zarr" else "stream", "workers": workers, "records": n,
            "seconds": seconds, "records_per_s": n / seconds, "disk_mb_per_s": disk / 1e6 / seconds,
            "decoded_mb_per_s": decoded / 1e6 / seconds, "bytes_per_record": disk / n}


def bench_reads(source_store: Path, work: Path, label: str, workers_list: list[int], codec: str = "fp16",
                records: int = 24, shards: int = 4) -> list[dict[str, Any]]:
    """Zarr vs WebDataset on the same records (``source_store``'s, replicated to ``records``)."""
    from benchmarks.common import transcode_store
    from umt_distill.cache.stores import CacheReader

    have = len(CacheReader(source_store))
    replicate = max(1, -(-records // have))
    per_shard = -(-have * replicate // shards)
    rows = []
    for layout in ("zarr", "wds"):
        dst = work / f"{label}_{layout}"
        transcode_store(source_store, dst, codec, layout=layout, replicate=replicate, records_per_shard=per_shard)
        for w in workers_list:
            log(f"reads: {label} {layout} workers={w}")
            rows.append({"targets": label, "codec": codec, **read_throughput(str(dst), layout, w)})
    return rows


def main() -> None:
    from benchmarks.common import scratch_dir, write_corpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--videos", type=int, default=8, help="distinct videos the clips cycle through (run.py's cpu preset: 4)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="decode worker counts")
    p.add_argument("--backends", default=",".join(DECODE_BACKENDS), help="video backends to time")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    with scratch_dir("bench_input_") as tmp:
        corpus = write_corpus(tmp / "videos", min(args.clips, args.videos), args.clips, 300, 240, 320)
        rows = [decode_throughput(corpus["manifest"], b, int(w), args.frames) for b in args.backends.split(",")
                for w in args.workers.split(",")]
    print(json.dumps({"corpus": corpus, "decode": rows}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"corpus": corpus, "decode": rows}, indent=1))


if __name__ == "__main__":
    from benchmarks.bench_input import main as package_main  # see bench_step.py

    package_main()
