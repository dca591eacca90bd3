"""How a callback shows what it draws: the input normalization undone (true colors), class names,
and the class each image is explained for (`target`).

The normalization undone for display: `mean`/`std` when given, else the datamodule's
`normalization`, else a torchvision `Normalize` found in the validation dataset's transforms, else
none (images shown as they are, said once); class names from the datamodule, else the validation
dataset's `classes`, else the label indices.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from convlens.callbacks.lightning_compat import val_dataset
from convlens.render import class_caption
from convlens.viz.common import eval_mode

#: the color of tile pixels outside a unit's receptive field (RGB in [0, 1])
OUTSIDE_COLOR = (0.72, 0.82, 0.95)


def color_outside(tiles: torch.Tensor) -> torch.Tensor:
    """Receptive-field tiles [M, 3, h, w] with their NaN pixels (outside the field) in `OUTSIDE_COLOR`."""
    color = torch.tensor(OUTSIDE_COLOR, dtype=tiles.dtype).view(1, 3, 1, 1).expand_as(tiles)
    return torch.where(torch.isnan(tiles), color, tiles)


def find_normalize(dataset: Any):
    """(mean, std) of a torchvision `Normalize` among a dataset's transforms (through Subset/Compose/
    nn.Sequential wrappers), or None."""
    from torchvision import transforms as T

    normalize_types = (T.Normalize,)
    try:
        from torchvision.transforms import v2

        normalize_types += (v2.Normalize,)
    except ImportError:  # pragma: no cover
        pass
    seen: set[int] = set()
    todo = [dataset]
    while todo:
        obj = todo.pop(0)
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            continue
        seen.add(id(obj))
        if isinstance(obj, normalize_types):
            return obj.mean, obj.std
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
            continue
        if isinstance(obj, nn.Module):
            todo.extend(obj.children())
        for attr in ("transforms", "transform", "dataset", "datasets"):
            value = getattr(obj, attr, None)
            if value is not None:
                todo.append(value)
    return None


def dataset_classes(dataset: Any) -> list[str] | None:
    """The `classes` names of a dataset (through Subset-like `.dataset` wrappers), or None."""
    for _ in range(8):
        if dataset is None:
            return None
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) and all(isinstance(c, str) for c in classes):
            return list(classes)
        dataset = getattr(dataset, "dataset", None)
    return None


class Normalization(nn.Module):
    """`(x - mean) / std` and its inverse, per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)


def resolve_targets(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """The class explained for each image: its label (`target="true"`) or the net's prediction."""
    if target == "true":
        return labels
    with torch.no_grad(), eval_mode(net):
        return net(images).argmax(dim=1)


class Display:
    """A callback's display settings, found once a run (`warn`: its once-only warning)."""

    def __init__(self, mean_std: tuple[torch.Tensor, torch.Tensor] | None, warn: Callable[[str], None]):
        self.mean_std, self.warn = mean_std, warn
        self._resolved = False
        self._normalization: Any = None
        self._class_names: list[str] | None = None

    def normalization(self, trainer):
        """The normalization undone for display (see the module docstring), or None."""
        if not self._resolved:
            self._normalization, self._resolved = self._find_normalization(trainer), True
        return self._normalization

    def _find_normalization(self, trainer):
        if self.mean_std is not None:
            return Normalization(*self.mean_std)
        dm = getattr(trainer, "datamodule", None)
        found = getattr(dm, "normalization", None) if dm is not None else None
        if found is not None:
            return found
        dataset = val_dataset(trainer)
        mean_std = find_normalize(dataset) if dataset is not None else None
        if mean_std is not None:
            return Normalization(*mean_std)
        if dm is None or not hasattr(dm, "normalization"):
            # one message for every callback: Python's warning filter shows it once a run
            self.warn("convlens callbacks: no normalization found (no mean/std argument, no datamodule "
                      "normalization, no torchvision Normalize in the validation dataset's transforms): images "
                      "are shown as they are; pass mean=[...], std=[...] for true colors")
        return None

    def class_names(self, trainer) -> Sequence[str]:
        dm = getattr(trainer, "datamodule", None)
        names = getattr(dm, "class_names", None) if dm is not None else None
        if names:
            return list(names)
        if self._class_names is None:
            self._class_names = dataset_classes(val_dataset(trainer)) or []
        if self._class_names:
            return self._class_names
        if dm is not None:
            return [str(i) for i in range(getattr(dm, "num_classes", 10))]
        return []  # class_caption shows the index

    def captions(self, trainer, labels) -> list[str]:
        """The class name of each label (its index where there is no name)."""
        names = self.class_names(trainer)
        return [class_caption(y, names) for y in labels]
