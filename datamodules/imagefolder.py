"""Any ImageNet-style tree: `<root>/train/<class>/*`, optionally `<root>/val/<class>/*` and
`<root>/test/<class>/*`. Only `datamodule.root` is needed:

- classes and their names are the folders of `train/` (num_classes is their count);
- channels is 1 if every image is grayscale, else 3;
- image_size defaults to the chosen model's (`model.default_image_size`: LeNet 28, the CIFAR nets
  32, VGG16 224), images are resized to it;
- without `val/`, `val_size` of `train/` is held out for validation; without `test/`, the test
  split is `val/` when there is one (never trained on; it only picks the best checkpoint), else
  `test_size` of `train/` held out (deterministic, disjoint from train and val): the test accuracy
  is never measured on training images. Which one is used is logged.

Explicit values win; a value that contradicts the folder (num_classes, or an ImageNet
normalization of grayscale images) is one clear error before anything is decoded. The class
count and channels are found at config time (the resolver `convlens_folder`), before the model is
built, from the files' headers only, and cached.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from .base import DataError, TensorBatches, TensorImageDataModule, cache_dir, data_dir, make_normalization
from .images import IMAGE_EXTENSIONS, load_image_folder

#: PIL modes of grayscale images (one channel of values, with or without alpha)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class FolderInfo:
    classes: list[str]
    empty_classes: list[str]
    channels: int
    images: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_root(root: str | Path) -> Path:
    """`root` as given if absolute, else relative to DATA_DIR."""
    return Path(root) if Path(root).is_absolute() else data_dir() / root


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def folder_info(root: str | Path) -> FolderInfo:
    """Classes (the folders of `<root>/train/`), the ones without images, and the channel count
    (1 if every image under root is grayscale, from the file headers), cached by the listing."""
    root = resolve_root(root)
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"Image folder {root} has no train/ folder; expected "
                        f"{root}/train/<class>/<images> (and optionally val/ and test/)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"Image folder {train} has no class sub-folders; expected {train}/<class_name>/<image files>")
    files = [f for split in ("train", "val", "test") if (root / split).is_dir() for f in _image_files(root / split)]
    key = hashlib.sha1(str(root.resolve()).encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    cache = cache_dir() / f"folderinfo-{root.name}-{key.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            return FolderInfo(**json.loads(cache.read_text()))
        except (ValueError, TypeError):
            pass  # a damaged cache file: scan again
    empty = [c for c in classes if not _image_files(train / c)]
    gray = True
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only
                mode = im.mode
        except Exception:
            continue  # unreadable: skipped with a warning when decoding
        if mode not in GRAY_MODES:
            gray = False
            break
    info = FolderInfo(classes=classes, empty_classes=empty, channels=1 if gray else 3, images=len(files))
    tmp = cache.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(asdict(info)))
        tmp.replace(cache)
    except OSError:
        pass  # no cache: scanned again next time
    return info


def folder_value(what: str, root) -> int:
    """`num_classes` or `channels` of the image folder at `root` (the config resolver
    `${convlens_folder:<what>,<root>}`)."""
    if root is None or str(root) in ("", "???"):
        raise DataError("datamodule.root is not set; pass the image folder: datamodule.root=/path/to/images")
    info = folder_info(root)
    if what not in ("num_classes", "channels"):
        raise DataError(f"convlens_folder: unknown value {what!r} (num_classes or channels)")
    return getattr(info, what)


class ImageFolderDataModule(TensorImageDataModule):
    def __init__(self, root: str, normalization: str = "channel", image_size: int = 64,
                 num_classes: int | None = None, channels: int | None = None, val_size: int | float = 0.1,
                 test_size: int | float = 0.1, **kwargs):
        self.root = resolve_root(root)
        info = folder_info(self.root)
        if num_classes is not None and num_classes != info.num_classes:
            raise DataError(f"{self.root / 'train'} has {info.num_classes} class folders "
                            f"({', '.join(info.classes[:10])}{', ...' if info.num_classes > 10 else ''}) "
                            f"but num_classes={num_classes}; drop the override (it is inferred) or fix it")
        channels = info.channels if channels is None else channels
        if channels not in (1, 3):
            raise DataError(f"datamodule.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if normalization == "imagenet" and channels != 3:
            raise DataError(f"normalization=imagenet needs 3-channel images, but the images in {self.root} "
                            f"are grayscale (channels=1); use datamodule.normalization=channel, or "
                            f"datamodule.channels=3 to read them as RGB")
        for name, value in (("val_size", val_size), ("test_size", test_size)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                    or (isinstance(value, float) and value >= 1):
                raise DataError(f"{name} must be a fraction in [0, 1) of train/ or an image count, got {value!r}")
        if info.empty_classes:
            warnings.warn(f"{self.root / 'train'}: class folder(s) {', '.join(info.empty_classes)} hold no image; "
                          f"the model is trained on {info.num_classes} classes but never sees "
                          f"{'that one' if len(info.empty_classes) == 1 else 'those'}", stacklevel=2)
        super().__init__(normalization=normalization, image_size=image_size, num_classes=info.num_classes,
                         channels=channels, val_size=val_size, **kwargs)
        self.test_size = test_size
        self.class_names = tuple(info.classes)
        self.folder_channels = info.channels
        #: where the test split comes from: "test/", "val/" or "held out of train/"
        self.test_source = "test/" if (self.root / "test").is_dir() else "val/" if (self.root / "val").is_dir() \
            else "held out of train/"

    def load(self, split: str):
        images, labels, _, sizes = load_image_folder(self.root / split, self.image_size, self.channels,
                                                     list(self.class_names), with_sizes=True)
        self.source_sizes.update(sizes)
        return images, labels

    def source(self) -> str:
        return f"image folder {self.root} (classes from the folders of train/)"

    def channels_note(self) -> str:
        files = "every file is grayscale" if self.folder_channels == 1 else "some files are in colour"
        return f"inferred: {files}" if self.channels == self.folder_channels \
            else f"set by datamodule.channels; {files}"

    def size_note(self) -> str:
        return "the model's default_image_size unless datamodule.image_size is set"

    @staticmethod
    def _count(size: int | float, n: int) -> int:
        return int(round(size * n)) if isinstance(size, float) else int(size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self._checked(self.load("train"), "train")
        n = len(labels)
        has_val, has_test = (self.root / "val").is_dir(), (self.root / "test").is_dir()
        n_test = 0 if has_test or has_val else self._count(self.test_size, n)
        n_val = 0 if has_val else self._count(self.val_size, n)
        if n_test + n_val >= n or (not has_val and n_val == 0) or (not (has_test or has_val) and n_test == 0):
            raise DataError(f"{self.root / 'train'} has {n} images: too few to hold out val_size={self.val_size} "
                            f"and test_size={self.test_size} (no val/ or test/ folder); add images or those folders")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        self.train_set = TensorBatches(images[train_idx], labels[train_idx])
        self.normalization = make_normalization(self.normalization_kind, self.train_set.images)

        def mixed(data, seed):  # folders are read class by class: mix the classes of a split
            order = torch.randperm(len(data[1]), generator=torch.Generator().manual_seed(seed))
            return TensorBatches(data[0][order], data[1][order])

        self.val_set = mixed(self._checked(self.load("val"), "val"), self.split_seed) if has_val \
            else TensorBatches(images[val_idx], labels[val_idx])
        if has_test:
            self.test_set = mixed(self._checked(self.load("test"), "test"), self.split_seed + 1)
        elif has_val:
            self.test_set = self.val_set
        else:
            self.test_set = TensorBatches(images[test_idx], labels[test_idx])
        held_out = f"held out of train/, split_seed={self.split_seed}"
        self.split_origins.update(train="train/" if has_val else "the rest of train/",
                                  val="val/" if has_val else held_out,
                                  test="test/" if has_test else "val/, no test/ folder" if has_val else held_out)
        self._make_resident()
        self.log_summary()
        if not has_test:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{self.root}: no test/ folder; the test split is " + (
                "val/ (never trained on; it also picks the best checkpoint, so test/acc is slightly optimistic)"
                if has_val else f"{len(test_idx)} images held out of train/ (test_size={self.test_size}), "
                                "disjoint from training and validation"))
