"""Datasets: digits (scikit-learn), MNIST / Fashion-MNIST / SVHN (torchvision), CelebA, image folders.

Two ways to feed a run (`train.loader`):

- memory: the split is one tensor on the run's device and a batch is an index into it, with
  no DataLoader worker overhead. MNIST, SVHN and digits always go this way; image folders
  and CelebA do when their decoded splits fit in MEMORY_LIMIT_BYTES (auto).
- stream: the split is a list of image files. A DataLoader's worker processes decode each
  batch (centre crop and resize in PIL, kept as uint8: a quarter of float32's bytes to pin
  and copy) into pinned memory, the copy to the device does not block, and the scaling to
  the spec's range happens there. CelebA at 64x64 is 10 GB as float32: streamed by default.

Both give the same batches, bit for bit: the shuffles are drawn the same way, and the float
conversion is the same arithmetic on the same uint8 pixels. Nothing is downloaded unless the
spec says `data.download: true`; a missing dataset is a RunError that says where the files go.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from genspec.compiler.distributed import SINGLE, shard
from genspec.errors import RunError
from genspec.lang.registry import FILE_DATASETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MEMORY_LIMIT_BYTES = 2 * 1024**3  # train.loader auto: image files decoded beyond this are streamed instead


def _positions(index) -> list[int]:
    """Positions as Python ints; one read-back for a tensor (int() of each element of a CUDA
    tensor would wait for the device once per image)."""
    return index.tolist() if torch.is_tensor(index) else [int(i) for i in index]


@dataclass(frozen=True)
class ImageFiles:
    """Image files of a split, decoded when a batch asks for them (train.loader: stream).

    `data` is the spec's data section (pad and range are applied after decoding); `workers`
    is the DataLoader's process count (0: decode in the training process)."""

    files: tuple
    size: int
    mode: str  # PIL mode: "RGB" or "L"
    data: dict
    workers: int = 0
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> "ImageFiles":
        """The files at `index` (a tensor or list of positions), in that order."""
        return replace(self, files=tuple(self.files[i] for i in _positions(index)))

    def to(self, device) -> "ImageFiles":
        return replace(self, device=torch.device(device))

    def decode(self, positions) -> torch.Tensor:
        """Images at `positions`, (N, C, H, W) on the device in the spec's range; threads decode them."""
        return self.finish(_decode_files([self.files[i] for i in _positions(positions)], self.size, self.mode))

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, C, H, W) -> float on the device, padded, in the spec's range."""
        pixels = pixels.to(self.device, non_blocking=True)
        return _transform(pixels.float() / 255.0, self.data)

    def batches(self, index_batches: list, y: torch.Tensor | None):
        """Decode `index_batches` (lists of positions) in worker processes, one pinned uint8 batch at a time."""
        from torch.utils.data import DataLoader

        workers = self.workers if len(index_batches) > 1 else 0  # one batch: not worth starting processes
        # A generator of its own: the DataLoader draws its workers' base seed from it, which from
        # torch's global one would shift the run's noise draws (decoding needs no randomness).
        loader = DataLoader(_DecodedFiles(self), batch_sampler=index_batches, num_workers=workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                            generator=torch.Generator().manual_seed(0))
        for idx, pixels in zip(index_batches, loader):
            yield self.finish(pixels), None if y is None else y[_to_device(torch.as_tensor(idx), y.device)]


def _to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU index tensor on `device` without waiting for it: a copy from ordinary host memory to
    the GPU blocks until the device has finished its queued work, one from pinned memory does not."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


class _DecodedFiles(torch.utils.data.Dataset):
    """What a DataLoader worker does: one file -> one uint8 (C, H, W) image."""

    def __init__(self, images: ImageFiles):
        self.files, self.size, self.mode = images.files, images.size, images.mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decode_file(self.files[i], self.size, self.mode)


@dataclass
class Split:
    x: torch.Tensor | ImageFiles  # (N, C, H, W) float in the spec's range, or files decoded per batch
    y: torch.Tensor | None  # (N,) int64 class labels, when the dataset has them

    def __len__(self) -> int:
        return len(self.x)

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, ImageFiles)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), None if self.y is None else self.y.to(device))

    def images(self, index=slice(None)) -> torch.Tensor:
        """The images at `index` (positions, or a slice) as one tensor on the split's device."""
        if not self.streamed:
            return self.x[index if isinstance(index, slice) else torch.as_tensor(index).to(self.x.device)]
        positions = range(len(self))[index] if isinstance(index, slice) else index
        return self.x.decode(positions)


@dataclass
class Splits:
    train: Split
    val: Split | None
    test: Split
    notes: list[str]


def data_root(data: dict) -> Path:
    return Path(data.get("root") or os.environ.get("GENSPEC_DATA") or "./data")


def load_data(data: dict, seed: int, loader: str = "auto", workers: int | str = "auto") -> Splits:
    """Load, transform (resize, pad, range) and split a dataset as the spec's `data` says.

    `loader` and `workers` are the spec's train.loader and train.workers: image files are held
    decoded in memory or streamed (see the module docstring)."""
    dataset = data["dataset"]
    if dataset in FILE_DATASETS:
        return _image_file_splits(data, seed, loader, resolve_workers(workers))
    if dataset == "digits":
        pools = [_digits()]
    elif dataset in ("mnist", "fashion_mnist"):
        pools = _torchvision_mnist(dataset, data)
    else:
        pools = _svhn(data)
    pool = data.get("pool", "official")
    if len(pools) == 2 and pool == "train":
        pools = pools[:1]  # every split drawn from the official training set (the thesis's 25k/10k/25k)
    elif len(pools) == 2 and pool == "all":
        pools = [(torch.cat([pools[0][0], pools[1][0]]), torch.cat([pools[0][1], pools[1][1]]))]
    pools = [(_transform(x, data), y) for x, y in pools]
    return _split(pools, data.get("split", {}), seed)


def resolve_workers(workers: int | str) -> int:
    """train.workers: auto is one decoding process per core but one, at most 8 (beyond that
    a 64x64 run is no longer waiting for JPEGs); under torchrun the cores are shared out
    among the training processes of this machine (LOCAL_WORLD_SIZE)."""
    if workers != "auto":
        return int(workers)
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores - 1))


def _image_file_splits(data: dict, seed: int, loader: str, workers: int) -> Splits:
    """Split the files first (only names are touched), then decode the chosen ones into memory,
    or keep them as files to stream when train.loader says so (auto: when they would not fit)."""
    pools = _celeba(data) if data["dataset"] == "celeba" else [_image_folder(data)]
    pools = [(replace(files, workers=workers), y) for files, y in pools]
    splits = _split(pools, data.get("split", {}), seed)
    parts = [s for s in (splits.train, splits.val, splits.test) if s is not None]
    channels = 1 if parts[0].x.mode == "L" else 3
    decoded_bytes = sum(len(s) for s in parts) * channels * data["image_size"] ** 2 * 4
    if loader == "stream" or (loader == "auto" and decoded_bytes > MEMORY_LIMIT_BYTES):
        splits.notes.append(f"streamed from image files: {decoded_bytes / 1024**3:.1f} GiB decoded as float32; "
                            f"{workers} DataLoader worker(s) decode each batch")
        return splits
    if len(parts[0]) > 10_000:  # CelebA-sized folders take a while to decode: say so
        print(f"genspec: decoding {sum(len(s) for s in parts)} images of {data['dataset']}", file=sys.stderr, flush=True)

    def decoded(split: Split | None) -> Split | None:
        return None if split is None else Split(split.images(), split.y)

    return Splits(decoded(splits.train), decoded(splits.val), decoded(splits.test), splits.notes)


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


def _image_folder(data: dict) -> tuple[ImageFiles, torch.Tensor]:
    root = data_root(data)
    if not root.is_dir():
        raise RunError(f"image folder {root.resolve()} does not exist: set data.root to a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RunError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root.resolve()}")
    mode = "L" if data.get("channels", 3) == 1 else "RGB"
    # Labels are sub-folder indices when images sit in class folders.
    classes = {folder: i for i, folder in enumerate(sorted({p.parent for p in files}))}
    y = torch.tensor([classes[p.parent] for p in files], dtype=torch.int64)
    return ImageFiles(tuple(files), data["image_size"], mode, data), y


def _decode_files(files: list, size: int, mode: str) -> torch.Tensor:
    """Decode, centre-crop and resize images on every core (PIL releases the GIL while decoding): uint8 (N, C, H, W)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return torch.stack(list(pool.map(lambda path: _decode_file(path, size, mode), files, chunksize=64)))


def _decode_file(path, size: int, mode: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return _centre_crop_resize(img.convert(mode), size)


def _celeba(data: dict) -> list[tuple[ImageFiles, torch.Tensor]]:
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
        files = tuple(Path(ds.root) / ds.base_folder / "img_align_celeba" / name for name in ds.filename)
        pools.append((ImageFiles(files, data["image_size"], "RGB", data), torch.zeros(len(files), dtype=torch.int64)))
    return pools


def _centre_crop_resize(img, size: int) -> torch.Tensor:
    """A PIL image -> its centre square resized (bicubic), as uint8 (C, H, W)."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()


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


def drops_last_batch(examples: int, batch_size: int, world_size: int = 1) -> bool:
    """Whether a training epoch leaves out its final, smaller batch: where some process's share of
    it would be no example, or one example where a full batch gives each process more (batch norm
    in training mode needs two; with one example a batch, as in batch_size 1, none is left out)."""
    last = examples % batch_size
    fewest = last // world_size  # `shard` deals a batch out round-robin: the last ranks get the fewest
    return last != 0 and (fewest == 0 or (fewest == 1 and batch_size // world_size > 1 and examples > 1))


def batch_starts(examples: int, batch_size: int, world_size: int = 1, training: bool = True) -> range:
    """Where each batch of an epoch starts: every batch in evaluation, in training all but the
    final batch that `drops_last_batch` leaves out."""
    starts = range(0, examples, batch_size)
    return starts[:-1] if training and drops_last_batch(examples, batch_size, world_size) else starts


def batches(split: Split, batch_size: int, generator: torch.Generator | None, world=None, training: bool = True):
    """Shuffled mini-batches of a split; in `training`, without the final batch that
    `drops_last_batch` leaves out. Evaluation (training=False) sees every example.

    Under `world` (several processes) every rank draws the same global batches and takes its
    own slice of each (the DistributedSampler's idea). Streamed splits decode only the rank's slice."""
    world = world or SINGLE
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if not split.streamed:
        order = order.to(split.x.device)  # one copy per epoch; each batch then indexes on the device
    index_batches = [shard(order[start:start + batch_size], None, world)[0]
                     for start in batch_starts(n, batch_size, world.size, training)]
    if split.streamed:
        yield from split.x.batches([idx.tolist() for idx in index_batches], split.y)
        return
    for idx in index_batches:
        yield split.x[idx], (None if split.y is None else split.y[idx])
