"""MNIST through torchvision: raw files under DATA_DIR/MNIST/raw are used as they are; otherwise
torchvision's real download, into the cache directory (never into DATA_DIR)."""
from __future__ import annotations

from torchvision.datasets import MNIST

from .base import DataError, TensorImageDataModule, cache_dir, data_dir


def _offline_help(name: str, looked: list, err: Exception) -> DataError:
    where = "\n  ".join(str(p) for p in looked)
    return DataError(
        f"{name} was not found and could not be downloaded ({type(err).__name__}: {err}).\n"
        f"Looked in:\n  {where}\n"
        f"Set DATA_DIR to a folder holding it (e.g. DATA_DIR=../shared/datasets python train.py), "
        f"run once with network access to download it, or use the offline synthetic data: "
        f"python train.py experiment=shapes_demo"
    )


class MNISTDataModule(TensorImageDataModule):
    class_names = tuple(str(i) for i in range(10))

    def __init__(self, root: str | None = None, download: bool = True, normalization: str = "mean_image",
                 batch_size: int = 100, val_size: int | float = 5000, **kwargs):
        kwargs.setdefault("channels", 1)
        kwargs.setdefault("image_size", 28)
        super().__init__(batch_size=batch_size, val_size=val_size, normalization=normalization, **kwargs)
        self.root, self.download = root, download

    def load(self, split: str):
        train = split == "train"
        roots = [data_dir(self.root), cache_dir() / "downloads"]
        for r in roots:
            try:
                ds = MNIST(str(r), train=train, download=False)
                break
            except RuntimeError:
                continue
        else:
            if not self.download:
                raise _offline_help("MNIST", [r / "MNIST" / "raw" for r in roots], RuntimeError("download=false"))
            try:
                ds = MNIST(str(roots[-1]), train=train, download=True)
            except Exception as e:
                raise _offline_help("MNIST", [r / "MNIST" / "raw" for r in roots], e) from e
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
