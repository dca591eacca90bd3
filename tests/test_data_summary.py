"""The one log line after the data is set up: what was found and inferred (classes, channels, image
size and whether the images were resized, the splits and their sizes).

Oracle: the folders and files the tests write themselves (their classes, modes and pixel sizes),
and the split sizes computed from the arguments; the counts in the line are checked against
`len()` of the splits the datamodule built.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from convlens.datamodules.imagefolder import ImageFolderDataModule
from convlens.datamodules.images import load_image_folder
from convlens.datamodules.shapes import ShapesDataModule
from convlens.datamodules.shapes_data import CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")


def summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "convlens.data" and r.levelno == logging.INFO]


def write_folder(root, splits: dict[str, int], classes=("cat", "dog", "emu"), size=(8, 8), mode="L"):
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_shapes_summary_is_logged_once_with_classes_channels_size_and_splits(caplog):
    caplog.set_level(logging.INFO, logger="convlens.data")
    dm = ShapesDataModule(n_train=120, n_test=30, val_size=20, batch_size=8)
    dm.setup("fit")
    dm.setup("test")  # a second setup logs nothing new
    lines = summary_lines(caplog)
    assert len(lines) == 1
    line = lines[0]
    assert "\n" not in line
    assert "synthetic shapes" in line
    assert f"{len(CLASSES)} classes ({', '.join(CLASSES)})" in line
    assert "1 channel (grayscale)" in line
    assert "images 28x28, as stored (not resized)" in line
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 20, 30)
    assert re.search(r"splits: train 100, val 20 \(held out of train, split_seed=0\), test 30", line)
    assert "normalization mean_image" in line


def test_image_folder_summary_says_what_was_inferred_and_that_8px_images_are_upscaled(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="convlens.data")
    write_folder(tmp_path / "digits", {"train": 10, "test": 4}, size=(8, 8))
    dm = ImageFolderDataModule(root=str(tmp_path / "digits"), image_size=28, val_size=6)
    dm.setup("fit")
    (line,) = summary_lines(caplog)
    assert "3 classes (cat, dog, emu)" in line
    assert "1 channel (grayscale; inferred: every file is grayscale)" in line
    # 3 classes x (10 train + 4 test) files, every one 8x8
    assert "images resized to 28x28 from 8x8 (all of the 42 files)" in line
    assert "default_image_size" in line
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 12)
    assert "train 24 (the rest of train/), val 6 (held out of train/, split_seed=0), test 12 (test/)" in line


def test_image_folder_summary_counts_the_files_of_other_sizes_and_a_channel_override(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="convlens.data")
    root = tmp_path / "mixed"
    write_folder(root, {"train": 5, "val": 2}, classes=("a", "b"), size=(16, 16))
    Image.fromarray(np.zeros((20, 12), np.uint8), "L").save(root / "train" / "a" / "wide.png")  # 12 wide, 20 high
    dm = ImageFolderDataModule(root=str(root), image_size=16, channels=3)
    dm.setup("fit")
    (line,) = summary_lines(caplog)
    assert "3 channels (RGB; set by datamodule.channels; every file is grayscale)" in line
    # 2 x (5 + 2) files at 16x16 are not resized; the one 12x20 file is
    assert "images resized to 16x16 from 12x20 (1 of the 15 files)" in line
    assert "train 11 (train/), val 4 (val/), test 4 (val/, no test/ folder)" in line


def test_image_folder_of_the_model_size_is_not_resized(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="convlens.data")
    write_folder(tmp_path / "rgb", {"train": 10}, classes=("x", "y"), size=(12, 12), mode="RGB")
    dm = ImageFolderDataModule(root=str(tmp_path / "rgb"), image_size=12, val_size=2, test_size=2)
    dm.setup("fit")
    (line,) = summary_lines(caplog)
    assert "3 channels (RGB; inferred: some files are in colour)" in line
    assert "images 12x12, as read (not resized)" in line
    assert "train 16 (the rest of train/), val 2 (held out of train/, split_seed=0), " \
           "test 2 (held out of train/, split_seed=0)" in line


def test_sizes_come_back_from_the_cache_and_from_a_cache_written_without_them(tmp_path):
    from convlens.datamodules.base import cache_dir

    write_folder(tmp_path / "f", {"train": 3}, classes=("a", "b"), size=(8, 6))
    root = tmp_path / "f" / "train"
    first = load_image_folder(root, 10, 1, with_sizes=True)
    cached = load_image_folder(root, 10, 1, with_sizes=True)
    assert first[3] == cached[3] == {(8, 6): 6}
    assert len(load_image_folder(root, 10, 1)) == 3  # the plain call keeps its three values
    # a cache file from before the sizes were stored: they are read off the files' headers
    import torch

    (cache,) = [p for p in cache_dir().glob("imagefolder-train-*.pt")
                if torch.equal(torch.load(p, weights_only=True)["images"], first[0])]
    torch.save({"images": first[0], "labels": first[1]}, cache)
    assert load_image_folder(root, 10, 1, with_sizes=True)[3] == {(8, 6): 6}


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    import torch

    from convlens.datamodules.base import cache_dir

    write_folder(tmp_path / "g", {"train": 2}, classes=("a", "b"), size=(5, 7))
    root = tmp_path / "g" / "train"
    before = set(cache_dir().glob("imagefolder-train-*.pt"))
    first = load_image_folder(root, 9, 1)
    (cache,) = set(cache_dir().glob("imagefolder-train-*.pt")) - before
    cache.write_bytes(b"not a torch file")
    again = load_image_folder(root, 9, 1, with_sizes=True)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert again[3] == {(5, 7): 4}
    torch.load(cache, weights_only=True)  # written anew
