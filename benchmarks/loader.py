#!/usr/bin/env python
"""Images per second that genspec's streamed loader (train.loader: stream) feeds to the device,
against the DataLoader a user would write by hand (torchvision's ImageFolder with CenterCrop,
Resize, ToTensor and Normalize, shuffled, pinned on CUDA), with the same worker counts.
Measures and prints; asserts nothing.

    .venv/bin/python benchmarks/loader.py --quick                  # 1,000 synthetic 178x218 JPEGs
    .venv/bin/python benchmarks/loader.py --root ~/data/celeba/img_align_celeba --images 20000

Without --root it writes CelebA-sized JPEGs (178x218, the aligned-and-cropped size) of smooth
noise into a temporary folder. Each (way, workers) result is one JSON line on stdout, also
appended to reports/benchmarks/loader.jsonl, with the machine, torch version and device;
`ratio` is genspec's images/s divided by the hand-written loader's (above 1: genspec is faster).
The time counts decoding, the copy to the device and the scaling to [-1, 1]; the loop waits for
the device at the end of each pass, so an asynchronous copy is not counted as free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "reports" / "benchmarks" / "loader.jsonl"


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,000 images, workers 0 and 1, one pass each")
    p.add_argument("--root", type=Path, help="a folder of images (default: synthetic CelebA-sized JPEGs)")
    p.add_argument("--images", type=int, default=4000, help="images to read per pass")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default: 0,1,..., up to the cores)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per way (the best one is reported)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args()


def machine(device) -> dict:
    import torch

    return {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "python": platform.python_version()}


def synthetic_jpegs(folder: Path, n: int) -> Path:
    """n 178x218 JPEGs of smooth colour noise (JPEG's cost depends on content: not flat colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(28, 23, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((178, 218), Image.Resampling.BILINEAR)
        img.save(folder / "faces" / f"{i:06d}.jpg", quality=90)
    return folder


def genspec_pass(split, batch_size: int, device) -> int:
    import torch

    from genspec.data.datasets import batches

    seen = 0
    for x, _ in batches(split, batch_size, torch.Generator().manual_seed(0)):
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen


def hand_pass(root: Path, n: int, size: int, batch_size: int, workers: int, device) -> int:
    """What one writes without genspec: ImageFolder + transforms + a shuffled, pinned DataLoader."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.CenterCrop(178), transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    dataset = Subset(datasets.ImageFolder(str(root), transform=transform), range(n))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    seen = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen


def best_rate(run, passes: int) -> tuple[float, int]:
    best, seen = 0.0, 0
    for _ in range(passes):
        began = time.perf_counter()
        seen = run()
        best = max(best, seen / (time.perf_counter() - began))
    return best, seen


def main() -> None:
    args = arguments()
    import torch

    from genspec.data.datasets import load_data

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = 1000 if args.quick else args.images
    passes = 1 if args.quick else args.passes
    cores = os.cpu_count() or 1
    workers = ([int(w) for w in args.workers.split(",")] if args.workers else
               [0, 1] if args.quick else sorted({0, 1, 2, min(4, cores), min(8, cores), cores - 1} - {-1}))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            print(f"benchmark: writing {n} synthetic 178x218 JPEGs", file=sys.stderr, flush=True)
            root = synthetic_jpegs(Path(tmp), n)
        data = {"dataset": "image_folder", "root": str(root), "image_size": args.image_size, "range": [-1, 1],
                "pad": 0, "split": {"train": n, "test": 0}}
        OUT.parent.mkdir(parents=True, exist_ok=True)
        for w in workers:
            split = load_data(data, 0, loader="stream", workers=w).train.to(device)
            ours, seen = best_rate(lambda: genspec_pass(split, args.batch_size, device), passes)
            theirs, _ = best_rate(lambda: hand_pass(root, n, args.image_size, args.batch_size, w, device), passes)
            result = {"benchmark": "loader", "workers": w, "images": seen, "image_size": args.image_size,
                      "batch_size": args.batch_size, "passes": passes, **machine(device),
                      "genspec_images_per_s": round(ours, 1), "hand_images_per_s": round(theirs, 1),
                      "ratio": round(ours / theirs, 3), "source": str(args.root) if args.root else "synthetic JPEGs"}
            line = json.dumps(result)
            print(line, flush=True)
            with open(OUT, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
