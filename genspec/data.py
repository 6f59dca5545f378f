"""Datasets as tensors: digits (scikit-learn), MNIST / Fashion-MNIST (torchvision), image folders.

Everything here is small enough to hold in memory, so batches are drawn by indexing one
tensor (on the run's device), with no DataLoader worker overhead. Nothing is downloaded
unless the spec says `data.download: true`; a missing dataset is a RunError that says
where the files go.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from .errors import RunError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) float in the spec's range
    y: torch.Tensor | None  # (N,) int64 class labels, when the dataset has them

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "Split":
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))


@dataclass
class Splits:
    train: Split
    val: Split | None
    test: Split
    notes: list[str]


def data_root(data: dict) -> Path:
    return Path(data.get("root") or os.environ.get("GENSPEC_DATA") or "./data")


def load_data(data: dict, seed: int) -> Splits:
    """Load, transform (resize, pad, range) and split a dataset as the spec's `data` says."""
    dataset = data["dataset"]
    if dataset == "digits":
        pools = [_digits()]
    elif dataset in ("mnist", "fashion_mnist"):
        pools = _torchvision_mnist(dataset, data)
    elif dataset == "svhn":
        pools = _svhn(data)
    elif dataset == "celeba":
        pools = _celeba(data)
    else:
        pools = [_image_folder(data)]
    pool = data.get("pool", "official")
    if len(pools) == 2 and pool == "train":
        pools = pools[:1]  # every split drawn from the official training set (the thesis's 25k/10k/25k)
    elif len(pools) == 2 and pool == "all":
        pools = [(torch.cat([pools[0][0], pools[1][0]]), torch.cat([pools[0][1], pools[1][1]]))]
    pools = [(_transform(x, data), y) for x, y in pools]
    return _split(pools, data.get("split", {}), seed)


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def _torchvision_mnist(dataset: str, data: dict):
    import torchvision

    cls, folder = {"mnist": (torchvision.datasets.MNIST, "MNIST"),
                   "fashion_mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST")}[dataset]
    root = data_root(data)
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=bool(data.get("download")))
        except RuntimeError as exc:
            raise RunError(
                f"{dataset} not found under {root.resolve()}: put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (or their .gz) in {root.resolve() / folder / 'raw'}, "
                f"or point data.root / GENSPEC_DATA at the folder holding {folder}/, or set data.download: true ({exc})"
            ) from None
        out.append((ds.data.unsqueeze(1).float() / 255.0, ds.targets.clone().long()))
    return out


def _svhn(data: dict):
    """The cropped-digits SVHN (73,257 train / 26,032 test), through torchvision's loader."""
    import torchvision

    root = data_root(data)
    out = []
    for split in ("train", "test"):
        try:
            ds = torchvision.datasets.SVHN(str(root), split=split, download=bool(data.get("download")))
        except RuntimeError as exc:
            raise RunError(f"svhn not found under {root.resolve()}: put train_32x32.mat and test_32x32.mat (the cropped "
                           f"digits of the SVHN site) directly in {root.resolve()}, or point data.root / GENSPEC_DATA at "
                           f"the folder holding them, or set data.download: true ({exc})") from None
        out.append((torch.from_numpy(ds.data).float() / 255.0, torch.from_numpy(ds.labels).long() % 10))
    return out


def _image_folder(data: dict):
    root = data_root(data)
    if not root.is_dir():
        raise RunError(f"image folder {root.resolve()} does not exist: set data.root to a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RunError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root.resolve()}")
    size, mode = data["image_size"], "L" if data.get("channels", 3) == 1 else "RGB"
    x = _load_images(files, size, mode)
    # Labels are sub-folder indices when images sit in class folders.
    classes = sorted({p.parent for p in files})
    y = torch.tensor([classes.index(p.parent) for p in files], dtype=torch.int64)
    return x, y


def _load_images(files: list, size: int, mode: str) -> torch.Tensor:
    """Decode, centre-crop and resize images on every core (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(path):
        with Image.open(path) as img:
            return _centre_crop_resize(img.convert(mode), size)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return torch.stack(list(pool.map(one, files, chunksize=64)))


def _celeba(data: dict):
    """Aligned-and-cropped CelebA with its official partition (162,770 / 19,867 / 19,962 images),
    centre-cropped and resized to data.image_size. torchvision reads the partition and checks the files."""
    import torchvision

    root = data_root(data)
    pools = []
    for split in ("train", "valid", "test"):
        try:
            ds = torchvision.datasets.CelebA(str(root), split=split, target_type=[], download=bool(data.get("download")))
        except RuntimeError as exc:
            folder = (root / "celeba").resolve()
            raise RunError(
                f"celeba not found under {root.resolve()}: put img_align_celeba/ (the aligned and cropped JPEGs), "
                "list_eval_partition.txt, list_attr_celeba.txt, identity_CelebA.txt, list_bbox_celeba.txt and "
                f"list_landmarks_align_celeba.txt in {folder}, or point data.root / GENSPEC_DATA at the folder "
                f"holding celeba/ ({exc})") from None
        files = [Path(ds.root) / ds.base_folder / "img_align_celeba" / name for name in ds.filename]
        print(f"genspec: loading {len(files)} CelebA {split} images", file=sys.stderr, flush=True)
        x = _load_images(files, data["image_size"], "RGB")
        pools.append((x, torch.zeros(len(x), dtype=torch.int64)))
    return pools


def _centre_crop_resize(img, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 255.0
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)


def _transform(x: torch.Tensor, data: dict) -> torch.Tensor:
    """x in [0, 1], (N, C, H, W) -> resized, padded, in the spec's range."""
    size = data.get("image_size")
    if size and data["dataset"] not in ("image_folder", "celeba") and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    pad = data.get("pad", 0)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))  # background 0 before the range change
    if list(data.get("range", [0, 1])) == [-1, 1]:
        x = x * 2 - 1
    return x.contiguous()


def _split(pools: list, sizes: dict, seed: int) -> Splits:
    """Draw train / val / test. With one pool (digits, image folders) all splits come from it;
    with an official train and test set, train and val come from the first, test from the second."""
    g = torch.Generator().manual_seed(seed)
    notes = []
    if len(pools) == 1:
        x, y = pools[0]
        n = len(x)
        n_test = sizes.get("test", max(1, n // 6))
        n_val = sizes.get("val", 0)
        n_train = sizes.get("train", n - n_test - n_val)
        if n_train + n_val + n_test > n:
            raise RunError(f"data.split asks for {n_train + n_val + n_test} images but the dataset has {n}")
        order = torch.randperm(n, generator=g)
        parts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:n_train + n_val + n_test]]
        train, val, test = (Split(x[i], y[i]) for i in parts)
        return Splits(train, val if n_val else None, test, notes)
    if len(pools) == 3:
        return _split_partition(pools, sizes, g, notes)
    (x_tr, y_tr), (x_te, y_te) = pools
    n_train = sizes.get("train", len(x_tr) - sizes.get("val", 0))
    n_val = sizes.get("val", 0)
    if n_train + n_val > len(x_tr):
        raise RunError(f"data.split asks for {n_train + n_val} training and validation images but the training set has {len(x_tr)}")
    n_test = sizes.get("test", len(x_te))
    if n_test > len(x_te):
        notes.append(f"test split: {len(x_te)} images available, {n_test} asked")
        n_test = len(x_te)
    order = torch.randperm(len(x_tr), generator=g) if (n_train + n_val) < len(x_tr) else torch.arange(len(x_tr))
    test_idx = torch.randperm(len(x_te), generator=g)[:n_test] if n_test < len(x_te) else torch.arange(len(x_te))
    train = Split(x_tr[order[:n_train]], y_tr[order[:n_train]])
    val = Split(x_tr[order[n_train:n_train + n_val]], y_tr[order[n_train:n_train + n_val]]) if n_val else None
    return Splits(train, val, Split(x_te[test_idx], y_te[test_idx]), notes)


def _split_partition(pools: list, sizes: dict, g: torch.Generator, notes: list) -> Splits:
    """An official train / validation / test partition (CelebA); sizes, when given, subsample each part."""
    parts = []
    for (x, y), key in zip(pools, ("train", "val", "test")):
        n = sizes.get(key, len(x))
        if n > len(x):
            notes.append(f"{key} split: {len(x)} images available, {n} asked")
            n = len(x)
        idx = torch.randperm(len(x), generator=g)[:n] if n < len(x) else torch.arange(len(x))
        parts.append(Split(x[idx], y[idx]) if n else None)
    return Splits(parts[0], parts[1], parts[2], notes)


def batches(split: Split, batch_size: int, generator: torch.Generator | None):
    """Shuffled mini-batches by indexing; a final batch of one is dropped (batch norm needs two)."""
    n = len(split)
    order = torch.randperm(n, generator=generator).to(split.x.device) if generator is not None else torch.arange(n, device=split.x.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2 and n > 1:
            break
        yield split.x[idx], (None if split.y is None else split.y[idx])
