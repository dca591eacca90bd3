"""Decoding an image-folder tree (`<root>/<class>/*.jpg|png|...`) once into uint8 tensors, cached.

The cache file is keyed by the source (absolute path, every file's name, size and mtime, and the
target size), so a changed folder is decoded again and an unchanged one never is. Corrupt or
unreadable image files are skipped with a warning that names them (the run goes on); a folder in
which no image can be read stops the run with an error that names it.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DataError, cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, class index)]) of an image-folder tree; DataError naming the problem."""
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"Image folder {root} has no class sub-folders; expected {root}/<class_name>/<image files>"
        )
    files = []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, i))
    if not files:
        raise DataError(
            f"Image folder {root} has class folders ({', '.join(classes[:10])}) but no image files "
            f"({'/'.join(IMAGE_EXTENSIONS)}) in them"
        )
    return classes, files


def _decode(path: Path, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The image as uint8 [C, size, size] and its (width, height) as stored, or None if unreadable."""
    try:
        with Image.open(path) as im:
            stored = im.size
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except Exception:
        return None
    return (a[None] if channels == 1 else a.transpose(2, 0, 1)), stored


#: at most this many of a folder's images are read by `read_image_files`
MAX_IMAGE_FILES = 64


def read_image_files(path: str | Path, size: int, channels: int) -> tuple[torch.Tensor, list[Path]]:
    """A user's own images: one image file, or the image files of a folder (and its sub-folders, in
    sorted order, at most MAX_IMAGE_FILES), decoded as the image datamodules decode theirs: uint8
    [N, channels, size, size] and the files read. A DataError names a path that holds none."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{path} holds no image files ({'/'.join(IMAGE_EXTENSIONS)}); pass image=<file or folder>")
        files = files[:MAX_IMAGE_FILES]
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"image={path} does not exist; pass an image file or a folder of images")
    decoded = [(f, _decode(f, size, channels)) for f in files]
    bad = [str(f) for f, d in decoded if d is None]
    if bad:
        raise DataError(f"cannot read {bad[0]} as an image{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; "
                        "pass image files PIL can open")
    return torch.from_numpy(np.stack([d[0] for _, d in decoded])), files


def _stored_sizes(files: list[tuple[Path, int]]) -> Counter:
    """(width, height) -> count, from the files' headers (for a cache written without them)."""
    sizes = Counter()
    for f, _ in files:
        try:
            with Image.open(f) as im:
                sizes[im.size] += 1
        except Exception:
            continue
    return sizes


def load_image_folder(root: str | Path, size: int, channels: int = 3, classes: list[str] | None = None,
                      with_sizes: bool = False):
    """All images under `root` as uint8 [N, C, size, size] with int64 labels and the class names;
    with `with_sizes`, also a Counter of the readable files' (width, height) as stored, before resizing."""
    root = Path(root).resolve()
    found, files = list_image_folder(root)
    if classes is not None and found != list(classes):
        raise DataError(f"Image folder {root} has classes {found}, expected {list(classes)}")
    key = hashlib.sha1(f"{root}|{size}|{channels}".encode())
    for f, _ in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    cache = cache_dir() / f"imagefolder-{root.name}-{key.hexdigest()[:16]}.pt"
    data = None
    if cache.is_file():
        try:
            data = torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache file is ours, not the user's data: decode the folder again
            data = None
    if data is not None:
        if not with_sizes:
            return data["images"], data["labels"], found
        sizes = Counter({(w, h): n for w, h, n in data["sizes"]}) if "sizes" in data else _stored_sizes(files)
        return data["images"], data["labels"], found, sizes
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda fl: _decode(fl[0], size, channels), files))
    arrays = [d[0] if d is not None else None for d in decoded]
    sizes = Counter(d[1] for d in decoded if d is not None)
    bad = [str(f) for (f, _), a in zip(files, arrays) if a is None]
    if len(bad) == len(files):
        raise DataError(f"No image in {root} could be decoded (e.g. {bad[0]})")
    if bad:
        warnings.warn(f"Skipped {len(bad)} unreadable image file(s) in {root}: {', '.join(bad[:10])}"
                      + (" ..." if len(bad) > 10 else ""), stacklevel=2)
    images = torch.from_numpy(np.stack([a for a in arrays if a is not None]))
    labels = torch.tensor([c for (_, c), a in zip(files, arrays) if a is not None], dtype=torch.long)
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": images, "labels": labels, "sizes": [[w, h, n] for (w, h), n in sizes.items()]}, tmp)
    tmp.replace(cache)  # atomic: parallel jobs never read a half-written cache
    return (images, labels, found, sizes) if with_sizes else (images, labels, found)
