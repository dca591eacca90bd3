"""CIFAR-10: torchvision's CIFAR10 (pickled batches) where present or downloadable, else the
image-folder tree DATA_DIR/cifar10-jpg/{train,test}/<class>/*.jpg (decoded once, cached)."""
from __future__ import annotations

import torch
from torchvision.datasets import CIFAR10

from .base import TensorImageDataModule, cache_dir, data_dir
from .images import load_image_folder
from .mnist import _offline_help

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR10DataModule(TensorImageDataModule):
    class_names = CIFAR10_CLASSES

    def __init__(self, root: str | None = None, download: bool = True, normalization: str = "channel",
                 batch_size: int = 64, val_size: int | float = 5000, **kwargs):
        super().__init__(batch_size=batch_size, val_size=val_size, normalization=normalization, **kwargs)
        self.root, self.download = root, download
        self.found_in = None  # where the images were read from

    def source(self) -> str:
        return f"CIFAR-10 from {self.found_in}" if self.found_in is not None else "CIFAR-10"

    def load(self, split: str):
        train = split == "train"
        root = data_dir(self.root)
        roots = [root, cache_dir() / "downloads"]
        for r in roots:
            try:
                ds = CIFAR10(str(r), train=train, download=False)
            except RuntimeError:
                continue
            self.found_in = r / "cifar-10-batches-py"
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        jpg = root / "cifar10-jpg" / split
        if jpg.is_dir():
            images, labels, _, sizes = load_image_folder(jpg, size=self.image_size, channels=self.channels,
                                                         classes=list(CIFAR10_CLASSES), with_sizes=True)
            self.found_in = jpg.parent
            self.source_sizes.update(sizes)
            return images, labels
        looked = [r / "cifar-10-batches-py" for r in roots] + [jpg]
        if not self.download:
            raise _offline_help("CIFAR-10", looked, RuntimeError("download=false"))
        try:
            ds = CIFAR10(str(roots[-1]), train=train, download=True)
        except Exception as e:
            raise _offline_help("CIFAR-10", looked, e) from e
        self.found_in = roots[-1] / "cifar-10-batches-py"
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
