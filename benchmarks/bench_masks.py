"""Mask draws per batch: one generator for the batch vs one generator per sample (stage 1's elastic order
gives each sample its own, from (seed, epoch, clip)), drawn as a loop of batches of one or as one batched
draw. Median milliseconds per batch, one torch thread, on the CPU (where the masks are drawn):

    .venv/bin/python -m benchmarks.bench_masks                      # B=64, T=8, N=196, ratio 0.8
    .venv/bin/python -m benchmarks.bench_masks --batch-size 32 --repeats 50
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from umt_distill.registry import MASKS
from umt_distill.stages.parts import sample_mask_generators


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--patches", type=int, default=196)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    B, T, N = a.batch_size, a.frames, a.patches
    attn = torch.rand(B, T, N, generator=torch.Generator().manual_seed(0)).softmax(-1)  # [B, T, N]
    clips, epochs = [f"clip{i}" for i in range(B)], [0] * B
    print(f"| mask (B={B}, T={T}, N={N}, ratio {a.ratio}) | one generator, ms | per sample, looped, ms "
          "| per sample, batched, ms |\n|---|---:|---:|---:|")
    for name in ("semantic", "random", "tube"):
        draw = MASKS.get(name)

        def whole():
            return draw(B, T, N, a.ratio, torch.Generator().manual_seed(0), attn=attn)

        def looped():
            gens = sample_mask_generators(0, epochs, clips)
            return torch.cat([draw(1, T, N, a.ratio, g, attn=attn[i : i + 1]) for i, g in enumerate(gens)])

        def batched():
            return draw(B, T, N, a.ratio, sample_mask_generators(0, epochs, clips), attn=attn)

        print(f"| {name} | {median_ms(whole, a.repeats):.2f} | {median_ms(looped, a.repeats):.2f} "
              f"| {median_ms(batched, a.repeats):.2f} |")


if __name__ == "__main__":
    main()
