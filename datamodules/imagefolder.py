"""Any ImageNet-style tree: `<root>/train/<class>/*` plus `<root>/val/<class>/*` (used as the
validation split; `test/` when present is the test split, else val doubles as test). Without
`val/`, `val_size` images are split off train. Images are resized to `image_size`."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import DataError, TensorImageDataModule, TensorBatches, data_dir, make_normalization
from .images import load_image_folder


class ImageFolderDataModule(TensorImageDataModule):
    def __init__(self, root: str, normalization: str = "imagenet", image_size: int = 64,
                 num_classes: int | None = None, **kwargs):
        self.root = Path(root) if Path(root).is_absolute() else data_dir() / root
        train = self.root / "train"
        if not train.is_dir():
            raise DataError(f"Image folder {self.root} has no train/ folder; expected "
                            f"{self.root}/train/<class>/<images> (and optionally val/ and test/)")
        classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
        if num_classes is not None and num_classes != len(classes):
            raise DataError(f"{train} has {len(classes)} class folders but num_classes={num_classes}")
        super().__init__(normalization=normalization, image_size=image_size,
                         num_classes=len(classes) or 1, **kwargs)
        self.class_names = tuple(classes)

    def load(self, split: str):
        folder = self.root / split
        if split == "test" and not folder.is_dir():
            folder = self.root / "val" if (self.root / "val").is_dir() else self.root / "train"
        images, labels, _ = load_image_folder(folder, self.image_size, self.channels, list(self.class_names))
        return images, labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and (self.root / "val").is_dir():
            self.train_set = TensorBatches(*self._checked(self.load("train"), "train"))
            images, labels = self._checked(self.load("val"), "val")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
            self.val_set = TensorBatches(images[order], labels[order])  # classes mixed, not folder order
            self.normalization = make_normalization(self.normalization_kind, self.train_set.images)
        super().setup(stage)
