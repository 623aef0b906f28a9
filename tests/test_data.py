"""Dataset sources on tiny files in the exact on-disk formats, the train/val split, and the resumable loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from bidst.data import (
    DatasetInfo,
    create_dataset,
    dataset_info,
    indexed_batches,
    list_datasets,
    make_loader,
    num_batches,
    roots,
)
from bidst.data.imagenet import random_resized_crop_box
from bidst.data.loader import epoch_order
from bidst.data.tensor import TensorImageDataset, random_crop_flip
from bidst.errors import BidstError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD = roots.download  # (the tests replace it: no network)


@pytest.fixture(autouse=True)
def isolated_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the user's data folders or the network."""
    monkeypatch.delenv("BIDST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url: str, *args: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(roots, "download", no_network)


def raw_pixels(dataset: TensorImageDataset, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a batch, back to uint8 grey levels."""
    mean = torch.tensor(dataset.normalize.mean).view(-1, 1, 1)
    std = torch.tensor(dataset.normalize.std).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, stem: str, data: bytes, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (stem + ".gz" if gz else stem)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_images(n: int, offset: int) -> np.ndarray:
    """n 28x28 images whose pixel (0, 0) is the item id (offset + i) and pixel (27, 3) is 200."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = offset + np.arange(n)
    images[:, 27, 3] = 200
    return images


def write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 4) -> None:
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        write_idx(folder, f"{prefix}-images-idx3-ubyte", idx_bytes(2051, tiny_images(n, offset)), gz)
        labels = (offset + np.arange(n)) % 10
        write_idx(folder, f"{prefix}-labels-idx1-ubyte", idx_bytes(2049, labels), gz)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_load(tmp_path: Path, gz: bool, name: str) -> None:
    write_mnist(tmp_path, gz)
    test = create_dataset(name, "test", root=str(tmp_path))
    assert len(test) == 4
    x, y = test.get_batch(torch.arange(4), None)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    pixels = raw_pixels(test, x)
    assert pixels[:, 0, 0, 0].tolist() == [100, 101, 102, 103]
    assert (pixels[:, 0, 27, 3] == 200).all() and pixels[:, 0, 1:, 4:].eq(0).all()
    assert y.tolist() == [0, 1, 2, 3]
    item_x, item_y = test[2]
    assert torch.equal(item_x, x[2]) and int(item_y) == 2


def test_idx_train_val_carve_out(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    ids = {}
    for split in ("train", "val"):
        ds = create_dataset("mnist", split, root=str(tmp_path), val_size=5)
        ids[split] = raw_pixels(ds, ds.get_batch(torch.arange(len(ds)), None)[0])[:, 0, 0, 0].tolist()
    assert len(ids["val"]) == 5 and len(ids["train"]) == 7
    assert sorted(ids["val"] + ids["train"]) == list(range(12))
    again = create_dataset("mnist", "val", root=str(tmp_path), val_size=5)  # fixed split, whatever the run seed
    assert raw_pixels(again, again.get_batch(torch.arange(5), None)[0])[:, 0, 0, 0].tolist() == ids["val"]
    assert len(create_dataset("mnist", "train", root=str(tmp_path), val_size=0)) == 12


@pytest.mark.parametrize(
    "corrupt,problem",
    [
        (lambda d: (2049).to_bytes(4, "big") + d[4:], "bad IDX magic"),
        (lambda d: d[:-10], "truncated"),
        (lambda d: d + b"\0", "trailing bytes"),
        (lambda d: d[:6], "truncated IDX header"),
    ],
)
def test_idx_corrupt_images(tmp_path: Path, corrupt, problem: str) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(BidstError, match=problem) as err:
        create_dataset("mnist", "test", root=str(tmp_path))
    assert str(path) in str(err.value)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(BidstError, match="cannot read") as err:
        create_dataset("mnist", "test", root=str(tmp_path))
    assert str(path) in str(err.value)


def test_idx_label_count_and_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(2049, np.arange(3)))
    with pytest.raises(BidstError, match="3 labels for 4 images") as err:
        create_dataset("mnist", "test", root=str(tmp_path))
    assert str(labels) in str(err.value)
    labels.write_bytes(idx_bytes(2049, np.array([0, 1, 2, 10])))
    with pytest.raises(BidstError, match="label 10 out of range"):
        create_dataset("mnist", "test", root=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_image_size_must_match(tmp_path: Path, name: str) -> None:
    """Valid IDX files of 32x32 images are refused up front, not fed to a model built for 28x28."""
    write_mnist(tmp_path, gz=False)
    path = write_idx(tmp_path, "t10k-images-idx3-ubyte", idx_bytes(2051, np.zeros((4, 32, 32), np.uint8)), gz=False)
    with pytest.raises(BidstError, match="images of 32x32 pixels, expected 28x28") as err:
        create_dataset(name, "test", root=str(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs the dataset-fashion-mnist package")
def test_fashion_mnist_real_files() -> None:
    train = create_dataset("fashion-mnist", "train")
    val = create_dataset("fashion-mnist", "val")
    test = create_dataset("fashion-mnist", "test")
    full = create_dataset("fashion-mnist", "train", val_size=0)
    assert (len(train), len(val), len(test), len(full)) == (55000, 5000, 10000, 60000)
    for ds in (train, val, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
    # train and val partition the official training set: compare multisets of per-image fingerprints
    weights = torch.randint(1, 1 << 20, (784,), generator=torch.Generator().manual_seed(0))

    def fingerprints(ds: TensorImageDataset) -> torch.Tensor:
        return (ds.images.view(len(ds), -1).long() * weights).sum(1) * 16 + ds.labels

    split = torch.cat([fingerprints(train), fingerprints(val)]).sort().values
    assert torch.equal(split, fingerprints(full).sort().values)
    x, _ = train.get_batch(torch.arange(2000), None)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


# ---------------------------------------------------------------- CIFAR


def cifar_batch(n: int, label_key: bytes, first_label: int, num_classes: int) -> dict:
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, 1] = first_label + np.arange(n)  # item id in red pixel (0, 1)
    return {
        b"batch_label": b"testing batch",
        b"data": data,
        label_key: [(first_label + i) % num_classes for i in range(n)],
        b"filenames": [b"x.png"] * n,
    }


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(folder: Path) -> None:
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(3, b"labels", 3 * (i - 1), 10))
    test = cifar_batch(2, b"labels", 50, 10)
    test[b"data"][0, 0] = 255  # red plane, pixel (0, 0)
    test[b"data"][0, 1024 + 5] = 200  # green plane, pixel (0, 5)
    test[b"data"][0, 2048 + 32 * 3 + 1] = 100  # blue plane, pixel (3, 1)
    write_pickle(folder / "test_batch", test)
    write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": 3})


def test_cifar10_layout_and_splits(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    test = create_dataset("cifar10", "test", root=str(tmp_path))
    pixels = test.images[0]
    assert pixels.shape == (3, 32, 32)
    assert (pixels[0, 0, 0], pixels[1, 0, 5], pixels[2, 3, 1]) == (255, 200, 100)
    assert int(pixels.sum()) == 255 + 200 + 100 + 50
    assert test.labels.tolist() == [0, 1]
    train = create_dataset("cifar10", "train", root=str(tmp_path / "cifar-10-batches-py"), val_size=0)
    assert train.images[:, 0, 0, 1].tolist() == list(range(15))  # batches 1..5 in order
    x, y = train.get_batch(torch.arange(15), None)
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [i % 10 for i in range(15)]
    val = create_dataset("cifar10", "val", root=str(tmp_path), val_size=4)
    assert len(val) == 4 and val.crop_padding == 0


def test_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "train", cifar_batch(5, b"fine_labels", 95, 100) | {b"coarse_labels": [0] * 5})
    write_pickle(folder / "test", cifar_batch(2, b"fine_labels", 0, 100))
    train = create_dataset("cifar100", "train", root=str(tmp_path), val_size=0, augment=True)
    assert train.labels.tolist() == [95, 96, 97, 98, 99] and train.crop_padding == 4 and train.hflip
    assert dataset_info("cifar100") == DatasetInfo(num_classes=100, in_channels=3, image_size=32)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"not a pickle at all", "not a CIFAR python batch"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "expected a dict with keys"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "uint8 array of shape N x 3072, found a uint8 "
                                                                      r"array of shape \(2, 100\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "found a float32 array of shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels out of range"),
        ({b"data": Evil(), b"labels": []}, "unexpected object"),
    ],
)
def test_cifar_corrupt(tmp_path: Path, content: object, problem: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    path = folder / "test_batch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_pickle(path, content)
    with pytest.raises(BidstError, match=problem) as err:
        create_dataset("cifar10", "test", root=str(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "labels,problem",
    [
        ([0.5, 1.5], "is not a list of integers"),  # was truncated to [0, 1]
        (np.array([0.0, 1.0]), "is not a list of integers"),
        ([0, 2**70], "labels out of range 0..9 .found 1180591620717411303424"),  # was an OverflowError
        (np.array([0, 1], dtype=">i8"), None),  # big-endian int64: fine
    ],
    ids=["float-list", "float-array", "huge-int", "big-endian-array"],
)
def test_cifar_labels_must_be_integers_in_range(tmp_path: Path, labels: object, problem: str | None) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    path = folder / "test_batch"
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels})
    if problem is None:
        assert create_dataset("cifar10", "test", root=str(tmp_path)).labels.tolist() == [0, 1]
        return
    with pytest.raises(BidstError, match=problem) as err:
        create_dataset("cifar10", "test", root=str(tmp_path))
    assert str(path) in str(err.value)


def test_cifar_truncated(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BidstError, match="data_batch_3"):
        create_dataset("cifar10", "train", root=str(tmp_path), val_size=0)


# ---------------------------------------------------------------- ImageNet folders


def write_jpeg(path: Path, size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    image[:, : size[0] // 2] = left
    image[:, size[0] // 2 :] = right
    Image.fromarray(image).save(path, quality=95)


def write_imagenet(root: Path) -> None:
    red, blue = (255, 0, 0), (0, 0, 255)
    for split, n in (("train", 3), ("val", 1)):
        for cls, size in (("n02", (40, 30)), ("n01", (30, 50))):
            for i in range(n):
                write_jpeg(root / split / cls / f"{cls}_{i}.JPEG", size, red, blue)
    (root / "train" / "n01" / "notes.txt").write_text("not an image")


def test_imagenet_folders(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    write_imagenet(tmp_path)
    test = create_dataset("imagenet", "test", root=str(tmp_path))
    assert [Path(p).name for p, _ in test.samples] == ["n01_0.JPEG", "n02_0.JPEG"]  # sorted class folders give labels
    x, y = test.get_batch(torch.arange(2), None)
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    # eval transform: resize the short side to 256, center-crop 224: the left edge is red, the right edge blue
    assert x[:, 0, :, :50].mean() > 1.5 and x[:, 2, :, :50].mean() < -1.0
    assert x[:, 2, :, -50:].mean() > 1.5 and x[:, 0, :, -50:].mean() < -1.0
    train = create_dataset("imagenet", "train", root=str(tmp_path), val_size=2, augment=True)
    val = create_dataset("imagenet", "val", root=str(tmp_path), val_size=2)
    assert len(train) == 4 and len(val) == 2 and not val.augment
    full = create_dataset("imagenet", "train", root=str(tmp_path), val_size=0)
    assert sorted(train.samples + val.samples) == sorted(full.samples)
    first = list(make_loader(train, batch_size=3, shuffle=True, seed=1, epoch=0))
    again = list(make_loader(train, batch_size=3, shuffle=True, seed=1, epoch=0, start_batch=1))
    assert first[0][0].shape == (3, 3, 224, 224) and len(first) == 2
    assert torch.equal(first[1][0], again[0][0]) and torch.equal(first[1][1], again[0][1])
    assert dataset_info("imagenet") == DatasetInfo(1000, 3, 224)


def test_imagenet_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    write_imagenet(tmp_path)
    bad = tmp_path / "val" / "n01" / "n01_0.JPEG"
    bad.write_bytes(b"\xff\xd8garbage")
    test = create_dataset("imagenet", "test", root=str(tmp_path))
    with pytest.raises(BidstError, match="cannot decode") as err:
        test.get_batch(torch.tensor([0]), None)
    assert str(bad) in str(err.value)
    (tmp_path / "val" / "n03").mkdir()
    with pytest.raises(BidstError, match="not in the training set: n03"):
        create_dataset("imagenet", "test", root=str(tmp_path))


def test_imagenet_folders_without_images_say_so(tmp_path: Path) -> None:
    """Class folders without images gave 'val_size=0 must be in 0..-1'; the official flat val/ gave 'no class
    folders' without saying the images must first be sorted into them."""
    pytest.importorskip("PIL")
    for cls in ("n01", "n02"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "notes.txt").write_text("not an image")
    with pytest.raises(BidstError, match=f"{tmp_path / 'train'}: no image files in its class folders .looked for .bmp"):
        create_dataset("imagenet", "train", root=str(tmp_path), val_size=0)
    write_imagenet(tmp_path)
    for image in list((tmp_path / "val").rglob("*.JPEG")):
        image.rename(tmp_path / "val" / image.name)
    for cls in ("n01", "n02"):
        (tmp_path / "val" / cls).rmdir()
    with pytest.raises(BidstError, match="val: no class folders .it holds the images themselves: sort them into one"):
        create_dataset("imagenet", "test", root=str(tmp_path))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bytes(width: int, height: int, tail: bytes = b"") -> bytes:
    """An RGB PNG of the given size whose IDAT holds 10 zero bytes, then `tail` instead of the IEND chunk."""
    header = png_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + (tail or png_chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "name,content",
    [
        ("maxval.ppm", b"P6\n64 64\n99999\n" + b"\0" * 100),  # Pillow: ValueError
        ("bomb.png", png_bytes(20000, 20000)),  # DecompressionBombError
        ("broken_chunk.png", png_bytes(2, 2, tail=b"\0\0\0\x05!!!!")),  # SyntaxError
    ],
    ids=["ppm-maxval", "png-bomb", "png-broken-chunk"],
)
def test_imagenet_undecodable_images(tmp_path: Path, name: str, content: bytes) -> None:
    pytest.importorskip("PIL")
    write_imagenet(tmp_path)
    bad = tmp_path / "val" / "n01" / name
    bad.write_bytes(content)
    test = create_dataset("imagenet", "test", root=str(tmp_path))
    with pytest.raises(BidstError, match="cannot decode image") as err:
        test.get_batch(torch.arange(len(test)), None)
    assert str(bad) in str(err.value)


def test_imagenet_more_class_folders_than_classes(tmp_path: Path) -> None:
    """1001 class folders would give label 1000, out of range of the 1000-class model: refused when loading."""
    for i in range(1001):
        (tmp_path / "train" / f"n{i:04d}").mkdir(parents=True)
    with pytest.raises(BidstError, match=f"{tmp_path / 'train'}: 1001 class folders, more than imagenet's 1000"):
        create_dataset("imagenet", "train", root=str(tmp_path), val_size=0)


def test_imagenet_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    train = create_dataset("imagenet", "train", root=str(tmp_path), val_size=0)
    with pytest.raises(BidstError, match="pip install Pillow"):
        train[0]


def test_random_resized_crop_box_in_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    for width, height in [(500, 375), (40, 30), (10, 200), (1, 1), (224, 224)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, generator)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


# ---------------------------------------------------------------- synthetic, registry, roots


def test_registry_and_info() -> None:
    assert {"mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic"} <= set(list_datasets())
    assert dataset_info("fashion-mnist") == DatasetInfo(num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(BidstError, match="unknown dataset 'svhn'.*cifar10"):
        dataset_info("svhn")
    with pytest.raises(BidstError, match="unknown split 'dev'"):
        create_dataset("synthetic", "dev")
    with pytest.raises(BidstError, match="no 'val' split with val_size=0"):
        create_dataset("synthetic", "val", val_size=0)
    with pytest.raises(BidstError, match="val_size=10000 must be in"):
        create_dataset("synthetic", "train", val_size=10000)


def test_synthetic_is_deterministic_and_learnable() -> None:
    train = create_dataset("synthetic", "train", val_size=1000)
    again = create_dataset("synthetic", "train", val_size=1000)
    test = create_dataset("synthetic", "test")
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert (len(train), len(test)) == (9000, 2000) and train.images.shape[1:] == (1, 28, 28)
    x, y = train.get_batch(torch.arange(len(train)), None)
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    xt, yt = test.get_batch(torch.arange(len(test)), None)
    nearest = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (nearest == yt).float().mean() > 0.9  # a nearest-class-mean classifier already learns it
    assert create_dataset("synthetic-rgb", "test").images.shape[1:] == (3, 32, 32)


def test_missing_data_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(roots.SYSTEM_DIRS, "fashion-mnist", [str(tmp_path / "nowhere")])
    with pytest.raises(BidstError, match="downloading it failed .*network disabled.*apt-get install dataset-fashion"):
        create_dataset("fashion-mnist", "train")
    with pytest.raises(BidstError, match="no data in .*cifar10.*cifar-10-python.tar.gz"):
        create_dataset("cifar10", "test")
    with pytest.raises(BidstError, match=f"no data in {tmp_path / 'empty'}; .*pass the folder .recipe key data_root, or root= in Python."):
        create_dataset("mnist", "test", root=str(tmp_path / "empty"))  # explicit root: no download attempt
    partial = tmp_path / "partial" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    (partial / "data_batch_1").write_bytes(b"")
    with pytest.raises(BidstError, match="it needs cifar-10-batches-py/ with data_batch_1, .*data_batch_5, test_batch"):
        create_dataset("cifar10", "test", root=str(partial.parent))  # an incomplete extraction names what it lacks


def test_a_folder_with_part_of_the_idx_files_names_the_missing_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A folder lacking one IDX file was 'no data' without the file's name, and as $BIDST_DATA it was passed over
    for the next place silently."""
    folder = tmp_path / "fashion-mnist"
    write_mnist(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    message = f"fashion-mnist: {folder} holds only part of the data: t10k-labels-idx1-ubyte missing"
    with pytest.raises(BidstError, match=message):
        create_dataset("fashion-mnist", "test", root=str(folder))
    monkeypatch.setenv("BIDST_DATA", str(tmp_path))
    write_mnist(tmp_path / "system", gz=False)
    monkeypatch.setitem(roots.SYSTEM_DIRS, "fashion-mnist", [str(tmp_path / "system")])
    with pytest.raises(BidstError, match=message):
        create_dataset("fashion-mnist", "test")


def serve(monkeypatch: pytest.MonkeyPatch, source: Path, fetched: list[str]) -> None:
    """roots.download as it is, fetching each URL's file name from `source` instead of the network."""
    monkeypatch.setattr(roots, "download", DOWNLOAD)

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        fetched.append(url)
        return io.BytesIO((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(roots.urllib.request, "urlopen", urlopen)


def test_download_into_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = tmp_path / "mirror"
    write_mnist(source, gz=True)
    monkeypatch.setitem(roots.SYSTEM_DIRS, "mnist", [])
    fetched: list[str] = []
    serve(monkeypatch, source, fetched)
    test = create_dataset("mnist", "test")
    assert len(test) == 4 and len(fetched) == 4
    assert (tmp_path / "cache" / "bidst" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    create_dataset("mnist", "test")
    assert len(fetched) == 4  # found in the cache the second time
    (tmp_path / "cache" / "bidst" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(create_dataset("mnist", "test")) == 4 and len(fetched) == 8  # a download cut short: fetched again


def test_a_download_that_is_not_the_file_is_not_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A proxy's error page served with 200 OK was kept in the cache, and every later run failed on it."""
    source = tmp_path / "mirror"
    write_mnist(source, gz=True)
    page = (source / "t10k-images-idx3-ubyte.gz").read_bytes()
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>please log in</html>")
    monkeypatch.setitem(roots.SYSTEM_DIRS, "mnist", [])
    serve(monkeypatch, source, [])
    with pytest.raises(BidstError, match=r"^mnist: no data in .* and downloading it failed \(https://\S+/t10k-images-idx3"
                                         r"-ubyte.gz gave something else than the expected file \(cannot read \(Not a "
                                         r"gzipped file .*\)\); it was not kept\); download the four IDX files"):
        create_dataset("mnist", "test")
    cache = tmp_path / "cache" / "bidst" / "mnist"
    assert "t10k-images-idx3-ubyte.gz" not in {p.name for p in cache.iterdir()} and not list(cache.glob(".partial-*"))
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(page)
    assert len(create_dataset("mnist", "test")) == 4  # the next run fetches it again
    # a bad file an older version kept in the cache: the error says how to get rid of it
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>")
    with pytest.raises(BidstError, match=f"cannot read .*in bidst's download cache: delete {cache} to download it again"):
        create_dataset("mnist", "test")


def test_fashion_mnist_augmentation_flips_and_mnist_does_not(tmp_path: Path) -> None:
    """Clothes are mirrored as in the usual Fashion-MNIST recipes; digits, which have a handedness, are not."""
    write_mnist(tmp_path, gz=False)
    for name, flips in (("fashion-mnist", True), ("mnist", False)):
        data = create_dataset(name, "train", root=str(tmp_path), augment=True, val_size=0)
        assert data.crop_padding == 2 and data.hflip is flips
        assert not create_dataset(name, "train", root=str(tmp_path), val_size=0).hflip


def test_bidst_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mnist(tmp_path / "data" / "mnist", gz=False)
    monkeypatch.setenv("BIDST_DATA", str(tmp_path / "data"))
    assert len(create_dataset("mnist", "test")) == 4


# ---------------------------------------------------------------- augmentation and loader


@pytest.mark.parametrize("pad,hflip", [(2, False), (0, True), (2, True)])
def test_random_crop_flip_gives_windows_and_mirrors(pad: int, hflip: bool) -> None:
    images = torch.randint(0, 256, (32, 3, 8, 6), dtype=torch.uint8)
    out = random_crop_flip(images, pad, hflip, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    seen = set()
    for img, crop in zip(padded, out):
        found = [
            (i, j, mirrored)
            for i in range(2 * pad + 1)
            for j in range(2 * pad + 1)
            for mirrored in ((False, True) if hflip else (False,))
            if torch.equal(img[:, i : i + 8, j : j + 6].flip(-1) if mirrored else img[:, i : i + 8, j : j + 6], crop)
        ]
        assert found
        seen.add(found[0])
    assert len(seen) > (5 if pad else 1)  # offsets (and mirrorings) vary


def indexed_dataset(n: int) -> TensorImageDataset:
    """A CIFAR-like augmented dataset whose label is the item index."""
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return TensorImageDataset(images, torch.arange(n), [0.5] * 3, [0.25] * 3, crop_padding=4, hflip=True)


def batches(dataset, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(make_loader(dataset, **kwargs))


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_deterministic_and_epochs_differ() -> None:
    ds = indexed_dataset(100)
    kw = dict(batch_size=16, shuffle=True, seed=3)
    first = batches(ds, epoch=0, **kw)
    assert_same(first, batches(ds, epoch=0, **kw))
    assert len(first) == 7 == num_batches(100, batch_size=16) == len(make_loader(ds, epoch=0, **kw))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(100))
    other = batches(ds, epoch=1, **kw)
    assert not torch.equal(first[0][1], other[0][1])
    assert not torch.equal(first[0][0], batches(ds, epoch=0, batch_size=16, shuffle=True, seed=4)[0][0])
    ordered = batches(ds, epoch=0, batch_size=16, shuffle=False, seed=3)
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(100))


def test_loader_resume_gives_the_tail_of_the_epoch() -> None:
    ds = indexed_dataset(100)
    kw = dict(batch_size=16, shuffle=True, seed=7, epoch=2)
    full = batches(ds, **kw)
    for start in (1, 4, 6):
        tail = make_loader(ds, start_batch=start, **kw)
        assert len(tail) == len(full) - start
        assert_same(list(tail), full[start:])  # images include the crop/flip augmentation
    assert batches(ds, start_batch=99, **kw) == []


def test_loader_rank_sharding() -> None:
    ds = indexed_dataset(101)
    world = 4
    shards = [batches(ds, batch_size=8, shuffle=True, seed=0, epoch=5, rank=r, world_size=world) for r in range(world)]
    labels = [torch.cat([y for _, y in shard]) for shard in shards]
    assert {len(lab) for lab in labels} == {26}  # ceil(101 / 4), padded
    assert set(torch.cat(labels).tolist()) == set(range(101))
    assert len(shards[0]) == num_batches(101, batch_size=8, world_size=world) == 4
    orders = [epoch_order(101, shuffle=True, seed=0, epoch=5, rank=r, world_size=world) for r in range(world)]
    assert torch.equal(torch.stack(orders, 1).flatten()[:101].sort().values, torch.arange(101))
    # ranks draw different augmentations, and each rank resumes exactly
    resumed = batches(ds, batch_size=8, shuffle=True, seed=0, epoch=5, rank=2, world_size=world, start_batch=2)
    assert_same(resumed, shards[2][2:])


@pytest.mark.parametrize("items,world,batch", [(11, 2, 4), (101, 4, 8), (50, 3, 6), (48, 4, 8)])
def test_ranks_with_drop_last_make_the_single_process_batches(items, world, batch) -> None:
    """Training drops the last partial batch: then the ranks' batches b together are one process's batch b (the
    same steps per epoch, each item at most once). Padding the order as for evaluation put repeated items into
    a kept batch where the item count does not divide (11 items, 2 ranks, batches of 4: three steps, not two)."""
    ds = indexed_dataset(items)
    kw = dict(shuffle=True, seed=0, epoch=3, drop_last=True)
    single = [y for _, y in batches(ds, batch_size=batch, **kw)]
    shards = [[y for _, y in batches(ds, batch_size=batch // world, rank=r, world_size=world, **kw)] for r in range(world)]
    assert all(len(shard) == len(single) == items // batch for shard in shards)
    for b, together in enumerate(zip(*shards)):
        assert torch.equal(torch.cat(together).sort().values, single[b].sort().values)
    per_rank = batch // world
    held = [indexed_batches(ds, batch_size=batch, seed=1, rank=r, world_size=world) for r in range(world)]
    one = indexed_batches(ds, batch_size=batch, seed=1)
    for j in range(2 * (items // batch)):  # two passes over the held-out stream
        together = torch.cat([h(j)[1] for h in held])
        assert len(together) == world * per_rank and torch.equal(together.sort().values, one(j)[1].sort().values)


def test_loader_drop_last_and_bad_settings() -> None:
    ds = indexed_dataset(50)
    out = batches(ds, batch_size=16, shuffle=False, seed=0, epoch=0, drop_last=True)
    assert [len(y) for _, y in out] == [16, 16, 16] and num_batches(50, batch_size=16, drop_last=True) == 3
    with pytest.raises(BidstError, match="bad loader settings"):
        make_loader(ds, batch_size=0, shuffle=False, seed=0, epoch=0)
    with pytest.raises(BidstError, match="bad loader settings"):
        make_loader(ds, batch_size=4, shuffle=False, seed=0, epoch=0, rank=2, world_size=2)


def test_loader_workers_match_in_process() -> None:
    ds = create_dataset("synthetic-rgb", "val", val_size=200, augment=True)
    kw = dict(batch_size=32, shuffle=True, seed=1, epoch=0, start_batch=2)
    state = torch.get_rng_state()
    assert_same(batches(ds, num_workers=2, **kw), batches(ds, **kw))
    # the workers' seeds come from a generator of their own: the global one, which checkpoints save, does not move
    assert torch.equal(torch.get_rng_state(), state)


class FailingDataset(TensorImageDataset):
    """A dataset whose batches holding item 5 fail to load, as one with an undecodable image file."""

    def get_batch(self, indices: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if 5 in indices.tolist():
            raise BidstError("/data/x.ppm: cannot decode image (ValueError: maxval)")
        return super().get_batch(indices, generator)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_worker_errors_stay_one_line(workers: int) -> None:
    """A BidstError in a DataLoader worker reaches the caller as itself, not wrapped in the worker's traceback."""
    ds = FailingDataset(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10), [0.5], [0.25])
    with pytest.raises(BidstError) as err:
        batches(ds, batch_size=2, shuffle=False, seed=0, epoch=0, num_workers=workers)
    assert str(err.value) == "/data/x.ppm: cannot decode image (ValueError: maxval)"


def test_indexed_batches_are_a_reshuffled_stream_per_rank() -> None:
    ds = indexed_dataset(50)
    draw = indexed_batches(ds, batch_size=16, seed=3)
    first = [draw(j) for j in range(3)]  # one pass: 3 batches of 16 out of 50 items, none repeated
    assert_same(first, [indexed_batches(ds, batch_size=16, seed=3)(j) for j in range(3)])  # a pure function of j
    labels = torch.cat([y for _, y in first])
    assert len(labels) == 48 and len(set(labels.tolist())) == 48
    assert not torch.equal(draw(3)[1], first[0][1])  # the next pass reshuffles
    assert not torch.equal(indexed_batches(ds, batch_size=16, seed=4)(0)[1], first[0][1])
    shards = [indexed_batches(ds, batch_size=16, seed=3, rank=r, world_size=2)(1) for r in range(2)]
    assert [len(y) for _, y in shards] == [8, 8] and not set(shards[0][1].tolist()) & set(shards[1][1].tolist())
    with pytest.raises(BidstError, match="held-out batch of 64 items is larger than the 50 held-out items"):
        indexed_batches(ds, batch_size=64, seed=0)
    with pytest.raises(BidstError, match="held-out batch of 15 items does not split evenly over 2 processes"):
        indexed_batches(ds, batch_size=15, seed=0, world_size=2)


def test_holdout_items_are_carved_out_of_training() -> None:
    from bidst.config import load_config
    from bidst.recipe import load_data

    cfg = load_config(None, ["dataset=synthetic", "train_subset=300", "val_size=100", "holdout_size=60"])
    train, holdout, _, _ = load_data(cfg)
    plain, none, _, _ = load_data(load_config(None, ["dataset=synthetic", "train_subset=300", "val_size=100"]))
    assert none is None and (len(train), len(holdout), len(plain)) == (240, 60, 300)
    rows = {tuple(img.flatten().tolist()) for img in plain.images}
    train_rows = {tuple(img.flatten().tolist()) for img in train.images}
    held_rows = {tuple(img.flatten().tolist()) for img in holdout.images}
    assert train_rows | held_rows == rows and not train_rows & held_rows
    with pytest.raises(BidstError, match="holdout_size 300 must be below the 300 training items"):
        load_data(load_config(None, ["dataset=synthetic", "train_subset=300", "val_size=100", "holdout_size=300"]))


def test_loader_plain_dataset() -> None:
    ds = TensorDataset(torch.arange(10).float().view(10, 1), torch.arange(10))
    out = batches(ds, batch_size=4, shuffle=True, seed=0, epoch=0)
    assert [len(y) for _, y in out] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in out]).tolist()) == list(range(10))
