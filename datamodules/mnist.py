"""MNIST and torchvision's other MNIST-format datasets: FashionMNIST, KMNIST, EMNIST, QMNIST.

The raw idx files are read where they are, gzipped or not, from `<DATA_DIR>/<Name>/raw/` (the
layout torchvision downloads into), else from the cache; otherwise torchvision downloads them into
the cache directory (never into DATA_DIR). Class names come with each dataset (FashionMNIST's
"T-shirt/top", ..., KMNIST's "o", "ki", ...), so every caption names the class.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from .base import DataError, TensorImageDataModule, cache_dir, data_dir

_DIGITS = tuple(str(i) for i in range(10))
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: the datasets `dataset=` names, each with its torchvision class (the download) and class names
DATASETS = {
    "MNIST": (tvd.MNIST, _DIGITS),
    "FashionMNIST": (tvd.FashionMNIST, tuple(tvd.FashionMNIST.classes)),
    "KMNIST": (tvd.KMNIST, tuple(tvd.KMNIST.classes)),
    "EMNIST": (tvd.EMNIST, None),   # classes depend on the split
    "QMNIST": (tvd.QMNIST, _DIGITS),
}
EMNIST_SPLITS = tuple(tvd.EMNIST.splits)
# idx type codes (the third byte of the magic number) -> numpy dtype, big-endian
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """A tensor from an idx file (LeCun's MNIST format), plain or gzipped (by the `.gz` suffix)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an idx file (bad magic number); download it again")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    array = np.frombuffer(data, dtype=_IDX_TYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: its header says {tuple(int(d) for d in dims)}, "
                        f"it holds {array.size} values; download it again")
    return torch.from_numpy(array.reshape(tuple(int(d) for d in dims)).astype(array.dtype.newbyteorder("="), copy=True))


def raw_files(dataset: str, split: str, emnist_split: str = "balanced") -> tuple[str, str]:
    """The (images, labels) raw file names of one split ("train" or "test") of `dataset`."""
    if dataset in ("MNIST", "FashionMNIST", "KMNIST"):
        return _MNIST_FILES[split]
    if dataset == "EMNIST":
        return (f"emnist-{emnist_split}-{split}-images-idx3-ubyte", f"emnist-{emnist_split}-{split}-labels-idx1-ubyte")
    return (f"qmnist-{split}-images-idx3-ubyte", f"qmnist-{split}-labels-idx2-int")


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _one_line(error: BaseException) -> str:
    """The last line of an error (torchvision's download errors list every mirror tried)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _offline_help(name: str, looked: list, err: BaseException, files: tuple[str, ...] = ()) -> DataError:
    where = "\n  ".join(str(p) for p in looked)
    expected = f" (files {', '.join(files)}, each plain or .gz)" if files else ""
    return DataError(
        f"{name} was not found and could not be downloaded ({_one_line(err)}).\n"
        f"Looked in{expected}:\n  {where}\n"
        f"Set DATA_DIR to a folder holding it (e.g. DATA_DIR=/path/to/datasets convlens-train), "
        f"run once with network access to download it, or use the offline synthetic data: "
        f"convlens-train experiment=shapes_demo"
    )


class MNISTDataModule(TensorImageDataModule):
    """MNIST (`dataset="MNIST"`), FashionMNIST, KMNIST, EMNIST (`emnist_split`: balanced, byclass,
    bymerge, digits, letters, mnist) or QMNIST, 28x28 grayscale. EMNIST's raw images are stored
    transposed; they are turned upright here."""

    def __init__(self, root: str | None = None, download: bool = True, normalization: str = "mean_image",
                 batch_size: int = 100, val_size: int | float = 5000, dataset: str = "MNIST",
                 emnist_split: str = "balanced", num_classes: int | None = None, **kwargs):
        if dataset not in DATASETS:
            raise DataError(f"Unknown dataset={dataset!r}; use one of {', '.join(DATASETS)}")
        if dataset == "EMNIST" and emnist_split not in EMNIST_SPLITS:
            raise DataError(f"Unknown emnist_split={emnist_split!r}; use one of {', '.join(EMNIST_SPLITS)}")
        names = DATASETS[dataset][1] or tuple(tvd.EMNIST.classes_split_dict[emnist_split])
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{dataset}{' ' + emnist_split if dataset == 'EMNIST' else ''} has {len(names)} "
                            f"classes, but num_classes={num_classes}; drop the override or set it to {len(names)}")
        kwargs.setdefault("channels", 1)
        kwargs.setdefault("image_size", 28)
        super().__init__(batch_size=batch_size, val_size=val_size, normalization=normalization,
                         num_classes=len(names), **kwargs)
        self.root, self.download, self.dataset, self.emnist_split = root, download, dataset, emnist_split
        self.class_names = names
        self.found_in: Path | None = None  # the folder the raw files were read from

    def source(self) -> str:
        name = f"{self.dataset} {self.emnist_split}" if self.dataset == "EMNIST" else self.dataset
        return f"{name} from {self.found_in}" if self.found_in is not None else name

    def load(self, split: str):
        files = raw_files(self.dataset, split, self.emnist_split)
        roots = [data_dir(self.root), cache_dir() / "downloads"]
        folders = [r / self.dataset / "raw" for r in roots]
        for folder in folders:
            found = [_find(folder, name) for name in files]
            if all(found):
                self.found_in = folder
                return self._read(*found)
        if not self.download:
            raise _offline_help(self.dataset, folders, RuntimeError("download=false"), files)
        tv_class = DATASETS[self.dataset][0]
        kwargs = {"split": self.emnist_split} if self.dataset == "EMNIST" else {}
        try:
            tv_class(str(roots[-1]), train=split == "train", download=True, **kwargs)
        except Exception as e:
            raise _offline_help(self.dataset, folders, e, files) from e
        found = [_find(folders[-1], name) for name in files]
        if not all(found):
            raise _offline_help(self.dataset, folders, FileNotFoundError("the download did not produce them"), files)
        self.found_in = folders[-1]
        return self._read(*found)

    def _read(self, images_file: Path, labels_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_idx(images_file), read_idx(labels_file)
        if labels.dim() == 2:  # QMNIST: one row of metadata per image, the class first
            labels = labels[:, 0]
        if self.dataset == "EMNIST":
            images = images.transpose(1, 2)
        if images.dim() != 3 or len(images) != len(labels):
            raise DataError(f"{images_file} and {labels_file} do not match: {tuple(images.shape)} images, "
                            f"{len(labels)} labels")
        return images.unsqueeze(1).contiguous(), labels.long()
