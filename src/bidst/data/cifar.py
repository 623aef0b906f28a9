"""CIFAR-10 and CIFAR-100 from the official python pickle batches, validated, kept in memory as uint8 tensors."""

from __future__ import annotations

import operator
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BidstError
from . import roots
from .base import DatasetInfo, register
from .tensor import TensorImageDataset

PIXELS = 3 * 32 * 32  # one row of b"data": the 1024 red, then green, then blue values, each plane row-major
CROP_PADDING = 4  # augment=True: random 32x32 crop of the image zero-padded by 4, then a random horizontal flip
# the only globals a batch pickle (numpy arrays, bytes) may reference: nothing else gets executed while unpickling
ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy", *(f"numpy.{core}.{sub}" for core in ("core", "_core") for sub in ("multiarray", "numeric")))
    for name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
} | {("_codecs", "encode")}


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and builtins but refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    """uint8 N x 3 x 32 x 32 images and int64 labels from one pickled batch, after checking its structure."""
    try:
        with open(path, "rb") as f:
            batch = NumpyUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise BidstError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # a corrupt pickle can fail in many ways, none of which the user can act on beyond this
        raise BidstError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise BidstError(f"{path}: not a CIFAR python batch (expected a dict with keys b'data' and {label_key!r})")
    data, labels = batch[b"data"], batch[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == PIXELS):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BidstError(f"{path}: b'data' must be a uint8 array of shape N x {PIXELS}, found a {found}")
    values = labels.tolist() if isinstance(labels, np.ndarray) else labels
    try:  # operator.index refuses floats (0.5 must not become 0); Python ints of any size pass, for the range check
        if not isinstance(values, (list, tuple)):
            raise TypeError
        ints = [operator.index(v) for v in values]
    except TypeError:
        raise BidstError(f"{path}: {label_key!r} is not a list of integers") from None
    if len(ints) != len(data):
        raise BidstError(f"{path}: {len(ints)} labels for {len(data)} images")
    outside = [v for v in ints if not 0 <= v < num_classes]
    if outside:
        raise BidstError(f"{path}: labels out of range 0..{num_classes - 1} (found {outside[0]})")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(ints, dtype=torch.int64)


def register_cifar(
    name: str,
    folder: str,
    files: dict[bool, list[str]],
    label_key: bytes,
    num_classes: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    url: str,
) -> None:
    """Register a CIFAR dataset whose root holds `folder` (or is it) with the batch `files` of each split."""

    def batch_dir(root: Path) -> Path:
        return root / folder if (root / folder).is_dir() else root

    def has(root: Path, f: str) -> bool:
        return (batch_dir(root) / f).is_file()

    needed = ", ".join(sorted({f for names in files.values() for f in names}))
    how_to = (f"it needs {folder}/ with {needed}: download {url} and extract it into $BIDST_DATA/{name} or "
              f"{roots.cache_dir(name)}, or pass the folder")  # fmt: skip

    @register(name, DatasetInfo(num_classes=num_classes, in_channels=3, image_size=32))
    def load(root: str | None, train: bool, augment: bool) -> TensorImageDataset:
        where = batch_dir(roots.locate(name, root, [f for names in files.values() for f in names], has, how_to))
        parts = [read_batch(where / f, label_key, num_classes) for f in files[train]]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        pad = CROP_PADDING if augment else 0
        return TensorImageDataset(images, labels, mean, std, crop_padding=pad, hflip=augment)


register_cifar(
    "cifar10",
    folder="cifar-10-batches-py",
    files={True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]},
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
register_cifar(
    "cifar100",
    folder="cifar-100-python",
    files={True: ["train"], False: ["test"]},
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)
