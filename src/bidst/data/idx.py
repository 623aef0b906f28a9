"""MNIST and Fashion-MNIST from their IDX files (.gz or raw), validated, kept in memory as uint8 tensors."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import BidstError
from . import roots
from .base import DatasetInfo, register
from .tensor import TensorImageDataset

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INFO = DatasetInfo(num_classes=10, in_channels=1, image_size=28)
CROP_PADDING = 2  # augment=True: random 28x28 crop of the image zero-padded by 2 (and a flip where `register_idx` says)


def find_file(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: Path, magic: int) -> Tensor:
    """The uint8 array stored in an IDX file, after checking its magic number and that its size matches its header."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a truncated .gz raises EOFError
        raise BidstError(f"{path}: cannot read ({e})") from None
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise BidstError(f"{path}: bad IDX magic number {found} (expected {magic}): not an IDX file of this kind")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BidstError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, actual = math.prod(dims), len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise BidstError(f"{path}: {problem}: header says shape {dims} ({expected} bytes), found {actual} bytes")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).copy()).reshape(dims)


def read_pair(folder: Path, train: bool, num_classes: int, image_size: int) -> tuple[Tensor, Tensor]:
    """uint8 N x 1 x H x W images (H = W = `image_size`) and int64 labels of the train or test IDX pair in `folder`,
    cross-checked."""
    paths = []
    for stem in FILES[train]:
        path = find_file(folder, stem)
        if path is None:
            raise BidstError(f"{folder / stem}: missing (neither it nor {stem}.gz exists)")
        paths.append(path)
    images = read_idx(paths[0], IMAGES_MAGIC)
    if images.shape[1:] != (image_size, image_size):
        raise BidstError(f"{paths[0]}: images of {images.shape[1]}x{images.shape[2]} pixels, expected "
                         f"{image_size}x{image_size}")
    labels = read_idx(paths[1], LABELS_MAGIC).long()
    if len(images) != len(labels):
        raise BidstError(f"{paths[1]}: {len(labels)} labels for {len(images)} images in {paths[0]}")
    if len(labels) and int(labels.max()) >= num_classes:
        raise BidstError(f"{paths[1]}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return images.unsqueeze(1), labels


def register_idx(name: str, mean: float, std: float, url: str, how_to: str, hflip: bool) -> None:
    """Register an IDX dataset looked for in the usual places and downloaded from `url` into the cache if absent;
    `hflip`: whether augmentation mirrors images left-right (clothes, yes; digits have a handedness)."""

    def has(folder: Path, stem: str) -> bool:
        return find_file(folder, stem) is not None

    def fetch(folder: Path) -> None:
        for stems in FILES.values():
            for stem, magic in zip(stems, (IMAGES_MAGIC, LABELS_MAGIC)):
                roots.download(f"{url}{stem}.gz", folder / f"{stem}.gz", lambda path, m=magic: read_idx(path, m))

    @register(name, INFO)
    def load(root: str | None, train: bool, augment: bool) -> TensorImageDataset:
        stems = [stem for pair in FILES.values() for stem in pair]
        folder = roots.locate(name, root, stems, has, how_to, fetch=fetch)
        try:
            images, labels = read_pair(folder, train, INFO.num_classes, INFO.image_size)
        except BidstError as e:
            if root is None and folder == roots.cache_dir(name):  # (a download an older version kept unchecked)
                raise BidstError(f"{e}; it is in bidst's download cache: delete {folder} to download it again") from None
            raise
        pad = CROP_PADDING if augment else 0
        return TensorImageDataset(images, labels, [mean], [std], crop_padding=pad, hflip=augment and hflip)


register_idx(
    "fashion-mnist",
    mean=0.2860,
    std=0.3530,
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    how_to="install it with `apt-get install dataset-fashion-mnist`, put the four IDX files in "
    "$BIDST_DATA/fashion-mnist, or pass the folder",
    hflip=True,
)
register_idx(
    "mnist",
    mean=0.1307,
    std=0.3081,
    url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    how_to="download the four IDX files from https://ossci-datasets.s3.amazonaws.com/mnist/ into $BIDST_DATA/mnist, "
    "or pass the folder",
    hflip=False,
)
