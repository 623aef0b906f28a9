"""ImageNet from class folders (root/{train,val}/<class>/*), decoded per item with Pillow, torchvision's transforms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BidstError, DataError
from . import roots
from .base import BatchDataset, DatasetInfo, register
from .tensor import Normalize

EXTENSIONS = {".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP, RESIZE = 224, 256  # train: RandomResizedCrop(224) + flip; eval: Resize(256) + CenterCrop(224)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's area fraction and aspect-ratio ranges
INFO = DatasetInfo(num_classes=1000, in_channels=3, image_size=CROP)


def pil_image() -> Any:
    """The PIL.Image module, imported on first use so that Pillow is needed only for ImageNet."""
    try:
        from PIL import Image
    except ImportError:
        raise BidstError("imagenet needs Pillow to decode images: pip install Pillow") from None
    return Image


def class_names(folder: Path) -> list[str]:
    """The class folder names in `folder`, sorted: their order gives the labels (as torchvision's ImageFolder)."""
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not names:
        images = any(entry.suffix.lower() in EXTENSIONS for entry in folder.iterdir())
        raise BidstError(f"{folder}: no class folders" + (
            " (it holds the images themselves: sort them into one folder per class, named as in train/; the official "
            "validation images come flat, with their classes in the devkit's ground-truth file)" if images else ""))
    return names


def scan(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image file under folder/<class>/, sorted by class then file name."""
    unknown = sorted(set(class_names(folder)) - set(classes))
    if unknown:
        raise BidstError(f"{folder}: class folders not in the training set: {', '.join(unknown[:5])}")
    found = [
        (str(path), label)
        for label, name in enumerate(classes)
        if (folder / name).is_dir()
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in EXTENSIONS
    ]
    if not found:
        raise BidstError(f"{folder}: no image files in its class folders (looked for {', '.join(sorted(EXTENSIONS))})")
    return found


def random_resized_crop_box(width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): 10 random tries, else a center crop."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=generator))

    area = width * height
    for _ in range(10):
        target = area * uniform(*SCALE)
        aspect = math.exp(uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, left + w, top + h
    ratio = width / height
    w, h = width, height
    if ratio < RATIO[0]:
        h = round(w / RATIO[0])
    elif ratio > RATIO[1]:
        w = round(h * RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The size for Resize(256) (short side to 256) and the CenterCrop(224) box in it, as torchvision has them."""
    short, long = min(width, height), max(width, height)
    long = int(RESIZE * long / short)
    size = (RESIZE, long) if width <= height else (long, RESIZE)
    left, top = int(round((size[0] - CROP) / 2)), int(round((size[1] - CROP) / 2))
    return size, (left, top, left + CROP, top + CROP)


class ImageFolderDataset(BatchDataset):
    """Labelled image files, decoded to RGB and transformed (augment: random crop + flip; else resize + center crop)."""

    def __init__(self, samples: list[tuple[str, int]], augment: bool) -> None:
        self.samples = samples
        self.augment = augment
        self.normalize = Normalize(MEAN, STD)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, generator: torch.Generator | None) -> Tensor:
        """The transformed uint8 3 x 224 x 224 image of item `index`."""
        image_mod = pil_image()
        path = self.samples[index][0]
        try:
            with image_mod.open(path) as f:
                image = f.convert("RGB")
        except Exception as e:  # OSError, ValueError, SyntaxError, DecompressionBombError...: a bad file, in any case
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
        if self.augment:
            width, height = image.size
            box = random_resized_crop_box(width, height, generator)
            image = image.resize((CROP, CROP), image_mod.Resampling.BILINEAR, box=box)
            if float(torch.rand(1, generator=generator)) < 0.5:
                image = image.transpose(image_mod.Transpose.FLIP_LEFT_RIGHT)
        else:
            size, box = center_crop_box(*image.size)
            image = image.resize(size, image_mod.Resampling.BILINEAR).crop(box)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def get_batch(self, indices: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Decode and transform the items at `indices` in order, drawing augmentation randomness from `generator`."""
        images = torch.stack([self.load(int(i), generator) for i in indices])
        labels = torch.tensor([self.samples[int(i)][1] for i in indices], dtype=torch.int64)
        return self.normalize(images), labels

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        """The items at `indices`, with the same transforms."""
        return ImageFolderDataset([self.samples[int(i)] for i in indices], self.augment)


@register("imagenet", INFO)
def load_imagenet(root: str | None, train: bool, augment: bool) -> ImageFolderDataset:
    """The official training images (train=True) or validation images, labelled by the sorted training class folders."""
    how_to = (
        "put the ILSVRC-2012 class folders under $BIDST_DATA/imagenet/{train,val} or "
        f"{roots.cache_dir('imagenet')}/{{train,val}}, or pass the folder"
    )
    folder = roots.locate("imagenet", root, ["train"], lambda p, f: (p / f).is_dir(), how_to)
    classes = class_names(folder / "train")
    if len(classes) > INFO.num_classes:
        raise BidstError(f"{folder / 'train'}: {len(classes)} class folders, more than imagenet's {INFO.num_classes} "
                         "classes")
    split = folder / ("train" if train else "val")
    if not split.is_dir():
        raise BidstError(f"{split}: missing; {how_to}")
    return ImageFolderDataset(scan(split, classes), augment)
