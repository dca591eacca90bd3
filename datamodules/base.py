"""The base of every datamodule: images decoded once into uint8 tensors held in memory.

An epoch never touches files: batches are sliced out of the tensors by index (one fancy-index per
batch, no per-item collate), moved to the device as uint8 (4x less to copy) and normalized there in
`on_after_batch_transfer`. The validation split and the probe batch are deterministic.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from convlens.errors import ConfigError, ConvlensError

log = logging.getLogger("convlens.data")


class DataError(ConvlensError, RuntimeError):
    """Data that cannot be found or read; the message says where we looked and what to do."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data root: `path` if given, else env DATA_DIR, else ./data. Read only: nothing is written there."""
    return Path(path if path is not None else os.environ.get("DATA_DIR", "./data")).expanduser()


_NO_CACHE: dict[str, Path] = {}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where decoded-tensor caches and downloads go (env CONVLENS_CACHE, default ~/.cache/convlens).
    A folder that cannot be written (read-only, not a folder) does not stop a run: one warning,
    then the run goes on without a cache (a temporary folder, removed when the process ends)."""
    p = Path(path if path is not None else os.environ.get("CONVLENS_CACHE", "~/.cache/convlens")).expanduser()
    key = str(p)
    if key in _NO_CACHE:
        return _NO_CACHE[key]
    probe = p / f".convlens-write-test-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        return p
    except OSError as e:
        import atexit
        import shutil
        import tempfile
        import warnings

        fallback = Path(tempfile.mkdtemp(prefix="convlens-nocache-"))
        atexit.register(shutil.rmtree, fallback, True)
        _NO_CACHE[key] = fallback
        warnings.warn(f"The cache folder {p} (CONVLENS_CACHE) cannot be written ({e.strerror or e}): running "
                      f"without a cache (downloads and decoded images go to {fallback}, removed at exit). Set "
                      f"CONVLENS_CACHE to a writable folder to keep them.", RuntimeWarning, stacklevel=2)
        return fallback


class Normalization(nn.Module):
    """Pixel images (uint8 0..255 or float 0..1) -> model input: (x - mean) / std.

    `mean` and `std` broadcast against [C, H, W]: per channel ([C, 1, 1]) or a mean image
    ([C, H, W], LeNet's preprocessing). `inverse` maps model input back to pixels in [0, 1], which
    is what renderings and the occlusion patch's gray use.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)


NORMALIZATIONS = ("mean_image", "mean_image_255", "channel", "imagenet", "raw_255", "none")


def make_normalization(kind: str, train_images: torch.Tensor) -> Normalization:
    """`mean_image` (subtract the training set's mean image), `mean_image_255` (the same on pixels
    in 0..255, MatConvNet's MNIST preprocessing), `channel` (per-channel mean/std of the training
    set), `imagenet` (torchvision's ImageNet statistics), `raw_255` (the pixels as they are, 0..255:
    what the Keras code of Berthier & Mantoux's CIFAR-10 report fed its net), or `none` (pixels
    in [0, 1])."""
    c = train_images.shape[1]
    if kind in ("mean_image", "mean_image_255"):
        mean = train_images.float().mean(0) / 255
        # a std of 1/255 maps [0, 1] back to 0..255, so inverse() still renders in [0, 1]
        return Normalization(mean, torch.full((c, 1, 1), 1 / 255 if kind == "mean_image_255" else 1.0))
    if kind == "channel":
        x = train_images.float() / 255
        mean = x.mean((0, 2, 3)).view(c, 1, 1)
        std = x.std((0, 2, 3)).clamp_min(1e-3).view(c, 1, 1)
        return Normalization(mean, std)
    if kind == "imagenet":
        if c != 3:
            raise ConfigError(f"normalization=imagenet needs 3-channel images, got {c}; use "
                              f"datamodule.normalization=channel (or mean_image)")
        return Normalization(torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
                             torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    if kind in ("none", "raw_255"):
        return Normalization(torch.zeros(c, 1, 1), torch.full((c, 1, 1), 1 / 255 if kind == "raw_255" else 1.0))
    raise ConfigError(f"Unknown normalization {kind!r}; use one of {', '.join(NORMALIZATIONS)} "
                      f"(datamodule.normalization=...)")


class TensorBatches(Dataset):
    """Indexed by a list of indices (from a BatchSampler): returns a whole batch at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Sequence[int]):
        index = torch.as_tensor(index)
        return self.images[index], self.labels[index]


class TensorImageDataModule(pl.LightningDataModule):
    """Base: subclasses implement `load(split)` -> (uint8 images [N, C, H, W], int64 labels [N])
    for split "train" or "test", and set `class_names`.

    `val_size` images (an int, or a fraction of the training set) are held out of "train" by a
    permutation seeded with `split_seed`, the same on every run.

    `resident`: keep every split on the training device (a GPU) once set up, so batches are
    sliced there and nothing is copied per step (CIFAR-10 is 150 MB as uint8); no effect on a CPU.
    """

    class_names: Sequence[str] = ()

    def __init__(self, batch_size: int = 64, val_size: int | float = 5000, split_seed: int = 0,
                 normalization: str = "channel", channels: int = 3, image_size: int = 32,
                 num_classes: int = 10, eval_batch_size: int | None = None,
                 hflip: bool = False, pin_memory: bool = False, resident: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}; set e.g. datamodule.batch_size=64")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.val_size, self.split_seed = val_size, split_seed
        self.normalization_kind = normalization
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.hflip, self.pin_memory, self.resident = hflip, pin_memory and not resident, resident
        self.normalization: Normalization | None = None
        self.train_set = self.val_set = self.test_set = None
        #: what each split is (e.g. "held out of train, split_seed=0"), for the data summary
        self.split_origins: dict[str, str] = {}
        #: (width, height) -> image count of the files as read, before any resizing; empty when the
        #: images are stored at `image_size` (MNIST, generated shapes)
        self.source_sizes: Counter = Counter()
        self._summary_logged = False

    def _make_resident(self) -> None:
        """Move the splits (and the normalization) to the trainer's device, once."""
        trainer = getattr(self, "trainer", None)
        if not self.resident or trainer is None:
            return
        device = trainer.strategy.root_device
        for split in (self.train_set, self.val_set, self.test_set):
            if split is not None and split.images.device != device:
                split.images, split.labels = split.images.to(device), split.labels.to(device)
        if self.normalization is not None:
            self.normalization.to(device)

    # -- what subclasses provide ---------------------------------------------------------------
    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- Lightning -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            images, labels = self._checked(self.load("train"), "train")
            n_val = int(round(self.val_size * len(labels))) if isinstance(self.val_size, float) else int(self.val_size)
            if not 0 < n_val < len(labels):
                raise ConfigError(f"val_size={self.val_size} leaves no train or no val images out of {len(labels)}; "
                                  f"set datamodule.val_size to a count between 1 and {len(labels) - 1} or a "
                                  f"fraction such as 0.1")
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
            # val keeps the permuted order: image folders are read class by class, and a first
            # validation batch of one class would make "the maximum over a batch" meaningless
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            self.train_set = TensorBatches(images[train_idx], labels[train_idx])
            self.val_set = TensorBatches(images[val_idx], labels[val_idx])
            self.normalization = make_normalization(self.normalization_kind, self.train_set.images)
            self.split_origins.setdefault("val", f"held out of train, split_seed={self.split_seed}")
        if self.test_set is None and stage in (None, "fit", "test"):
            images, labels = self._checked(self.load("test"), "test")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed + 1))
            self.test_set = TensorBatches(images[order], labels[order])  # mixed classes, as for val
        self._make_resident()
        self.log_summary()

    def _checked(self, data, split):
        images, labels = data
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{type(self).__name__}.load({split!r}) must give uint8 [N, C, H, W] images")
        _, c, h, w = images.shape
        if c != self.channels or (h, w) != (self.image_size, self.image_size):
            raise DataError(
                f"{type(self).__name__}: the {split} images are {c}x{h}x{w} but the config says "
                f"channels={self.channels}, image_size={self.image_size}; fix the datamodule config"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"{type(self).__name__}: {split} labels outside 0..{self.num_classes - 1}")
        return images, labels.long()

    def _loader(self, dataset: TensorBatches, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                          batch_size=None, pin_memory=self.pin_memory)

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if images.dtype == torch.uint8:  # normalize on the device, once per batch
            images = self.normalization(images)
            if self.hflip and self.trainer is not None and self.trainer.training:
                flip = torch.rand(images.shape[0], device=images.device) < 0.5
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, labels

    # -- what was found and inferred -----------------------------------------------------------
    def source(self) -> str:
        """Where the images came from (a dataset name and folder); subclasses say more."""
        return type(self).__name__

    def channels_note(self) -> str:
        """Why the images have `channels` channels, when that was inferred (an image folder)."""
        return ""

    def size_note(self) -> str:
        """Where `image_size` comes from, when it was not the data's own (an image folder)."""
        return ""

    def summary(self) -> str:
        """One line: the source, classes, channels, image size and whether the images were resized
        (to what, from what), the splits with their sizes and origins, the normalization."""
        names = [str(n) for n in self.class_names] or [str(i) for i in range(self.num_classes)]
        shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        channels = f"{self.channels} channel{'s' if self.channels != 1 else ''} " \
                   f"({'grayscale' if self.channels == 1 else 'RGB'}"
        channels += f"; {self.channels_note()})" if self.channels_note() else ")"
        size = f"{self.image_size}x{self.image_size}"
        others = sorted((wh for wh in self.source_sizes if wh != (self.image_size, self.image_size)),
                        key=lambda wh: (-self.source_sizes[wh], wh))
        if not self.source_sizes:
            sizing = f"images {size}, as stored (not resized)"
        elif not others:
            sizing = f"images {size}, as read (not resized)"
        else:
            n, total = sum(self.source_sizes[wh] for wh in others), sum(self.source_sizes.values())
            found = ", ".join(f"{w}x{h}" for w, h in others[:3]) + (", ..." if len(others) > 3 else "")
            sizing = f"images resized to {size} from {found} ({'all' if n == total else n} of the {total} files)"
        if self.size_note():
            sizing += f"; image_size {self.image_size} is {self.size_note()}"
        splits = []
        for name, split in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            if split is not None:
                origin = self.split_origins.get(name)
                splits.append(f"{name} {len(split)}" + (f" ({origin})" if origin else ""))
        return (f"Data: {self.source()}: {self.num_classes} classes ({shown}); {channels}; {sizing}; "
                f"splits: {', '.join(splits)}; normalization {self.normalization_kind}")

    def log_summary(self) -> None:
        """Log `summary()` once (INFO, logger `convlens.data`: the console and the run's train.log),
        from the first process only."""
        if self._summary_logged or self.train_set is None:
            return
        self._summary_logged = True
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:
            log.info("%s", self.summary())

    # -- what callbacks ask for ----------------------------------------------------------------
    def probe_batch(self, per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed probe batch from the validation split: the first `per_class` images of each class,
        in class order, normalized (model input space). The same on every run."""
        if self.val_set is None:
            self.setup("fit")
        labels = self.val_set.labels
        picks = [i for c in range(self.num_classes) for i in (labels == c).nonzero().flatten()[:per_class].tolist()]
        idx = torch.tensor(picks, dtype=torch.long)
        return self.normalization(self.val_set.images[idx]), labels[idx]

    def state_dict(self):
        return {}
