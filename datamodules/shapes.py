"""Synthetic shapes (bars, corners, crosses, rings, letters) generated in code: no files, no network.

Makes `experiment=shapes_demo` a fully offline demo; each object's bounding box is kept
(`boxes` of each split) so tests can check that a method localizes the object.
"""
from __future__ import annotations

import torch

from convlens.errors import ConfigError

from .base import TensorImageDataModule
from .shapes_data import CLASSES, make_shapes


class ShapesDataModule(TensorImageDataModule):
    class_names = CLASSES

    def __init__(self, n_train: int = 10000, n_test: int = 2000, seed: int = 0, channels: int = 1,
                 image_size: int = 28, normalization: str = "mean_image", batch_size: int = 64,
                 val_size: int | float = 2000, num_classes: int = len(CLASSES), **kwargs):
        if num_classes != len(CLASSES):
            raise ConfigError(f"shapes has {len(CLASSES)} classes ({', '.join(CLASSES)}), not {num_classes}; drop "
                              f"the datamodule.num_classes override")
        super().__init__(batch_size=batch_size, val_size=val_size, normalization=normalization,
                         channels=channels, image_size=image_size, num_classes=num_classes, **kwargs)
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.boxes: dict[str, torch.Tensor] = {}

    def source(self) -> str:
        return f"synthetic shapes generated in code (seed {self.seed})"

    def load(self, split: str):
        n, seed = (self.n_train, self.seed) if split == "train" else (self.n_test, self.seed + 1_000_003)
        data = make_shapes(n, size=self.image_size, channels=self.channels, seed=seed)
        self.boxes[split] = data.boxes
        return data.images, data.labels
