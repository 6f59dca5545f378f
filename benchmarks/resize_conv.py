#!/usr/bin/env python
"""Seconds per forward and backward of a resize-convolution (nearest `upsample s`, then a stride-1
conv), as genspec computes it (one transposed convolution, layers.ResizeConv2d) and as the two
rows read (F.interpolate, then nn.Conv2d), beside the x s transposed convolution it often
replaces. Measures and prints one JSON line per shape; asserts nothing.

    .venv/bin/python benchmarks/resize_conv.py                # seed 004's generator head, 1 thread
    .venv/bin/python benchmarks/resize_conv.py --threads 2 --device cuda

The default shape is specs/cgan_mbl/noise_bn_resize.yaml's last rows at batch 256: 128 channels
at 7x7, `upsample 4`, `conv 1 5x5`. The second is a ResNet generator's `upsample 2, conv 128 3x3`
at 16x16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from genspec.compiler.layers import ResizeConv2d  # noqa: E402

SHAPES = [  # (batch, channels in, size, scale, channels out, kernel)
    (256, 128, 7, 4, 1, 5),
    (64, 128, 16, 2, 128, 3),
]


def seconds(step, device: str, repeats: int) -> float:
    step()  # warm-up: kernel selection, allocations
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(shape: tuple, device: str, repeats: int) -> dict:
    batch, c_in, size, scale, c_out, k = shape
    x = torch.randn(batch, c_in, size, size, device=device, requires_grad=True)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2).to(device)
    fused = ResizeConv2d(conv, scale)
    deconv = nn.ConvTranspose2d(c_in, c_out, k, scale, k // 2, output_padding=scale - 1).to(device)

    def as_written():
        conv(F.interpolate(x, scale_factor=scale, mode="nearest")).sum().backward()

    def genspec():
        fused(x).sum().backward()

    def transposed():
        deconv(x).sum().backward()

    times = {name: seconds(step, device, repeats) for name, step in
             [("as_written_s", as_written), ("genspec_s", genspec), ("deconv_s", transposed)]}
    return {"shape": {"batch": batch, "in": c_in, "size": size, "scale": scale, "out": c_out, "kernel": k},
            **{name: round(t, 5) for name, t in times.items()},
            "speedup": round(times["as_written_s"] / times["genspec_s"], 2),
            "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for shape in SHAPES:
        print(json.dumps(measure(shape, args.device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
