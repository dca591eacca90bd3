"""Datamodules: in-memory uint8 batches, deterministic splits and probes, caches outside DATA_DIR,
and a clear message for every kind of missing or bad data."""
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from convlens.datamodules.base import DataError, make_normalization
from convlens.datamodules.cifar10 import CIFAR10DataModule
from convlens.datamodules.imagefolder import ImageFolderDataModule
from convlens.datamodules.images import load_image_folder
from convlens.datamodules.mnist import MNISTDataModule
from convlens.datamodules.shapes import ShapesDataModule


def write_folder(root, classes=("cat", "dog"), per_class=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_batches_are_sliced_from_uint8_and_normalized_after_transfer():
    dm = ShapesDataModule(n_train=300, n_test=50, val_size=60, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (32, 1, 28, 28) and y.shape == (32,)
    xn, yn = dm.on_after_batch_transfer((x, y), 0)
    expected = x.float() / 255 - dm.train_set.images.float().mean(0) / 255  # mean image subtracted
    torch.testing.assert_close(xn, expected)
    assert torch.equal(yn, y)
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 240


def test_val_split_and_probe_are_deterministic():
    a = ShapesDataModule(n_train=300, n_test=50, val_size=60)
    b = ShapesDataModule(n_train=300, n_test=50, val_size=60)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not set(a.val_set.labels.tolist()) - set(range(10))
    assert len(set(a.val_set.labels[:20].tolist())) > 3  # classes mixed, not in folder order
    pa, la = a.probe_batch()
    pb, lb = b.probe_batch()
    assert torch.equal(pa, pb) and la.tolist() == list(range(10))
    torch.testing.assert_close(a.normalization.inverse(pa), a.val_set.images[
        torch.tensor([int((a.val_set.labels == c).nonzero()[0]) for c in range(10)])].float() / 255)


def test_normalizations_invert():
    imgs = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    for kind in ("mean_image", "mean_image_255", "channel", "imagenet", "none"):
        n = make_normalization(kind, imgs)
        torch.testing.assert_close(n.inverse(n(imgs)), imgs.float() / 255)
    # MatConvNet's MNIST preprocessing: 0..255 pixels minus the mean 0..255 image
    raw = imgs.double()
    torch.testing.assert_close(make_normalization("mean_image_255", imgs)(imgs).double(), raw - raw.mean(0),
                               rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="mean_image, mean_image_255, channel"):
        make_normalization("zscore", imgs)


def test_image_folder_decoded_once_cached_outside_data_dir(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data" / "train")
    before = snapshot(tmp_path / "data")
    images, labels, classes = load_image_folder(root, size=8)
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8 and classes == ["cat", "dog"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert snapshot(tmp_path / "data") == before  # nothing written into the data root
    import convlens.datamodules.images as mod
    monkeypatch.setattr(mod, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    again, _, _ = load_image_folder(root, size=8)
    assert torch.equal(again, images)
    # a changed source is a different cache key: decoded again
    monkeypatch.undo()
    write_folder(root, classes=("cat",), per_class=4, seed=1)
    assert load_image_folder(root, size=8)[0].shape[0] == 7


def test_imagefolder_datamodule_with_val_folder(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=4)
    write_folder(tmp_path / "d" / "val", per_class=2, seed=3)
    dm = ImageFolderDataModule(root=str(tmp_path / "d"), image_size=16, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 4 and dm.class_names == ("cat", "dog")


def test_empty_or_malformed_image_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="no train/ folder"):
        ImageFolderDataModule(root=str(tmp_path / "nothing"))
    (tmp_path / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "train" / "x.png")
    with pytest.raises(DataError, match=r"no class sub-folders.*<class_name>"):
        load_image_folder(tmp_path / "flat" / "train", size=8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_image_folder(tmp_path / "empty", size=8)


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path):
    root = write_folder(tmp_path / "train")
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="broken.jpg"):
        images, labels, _ = load_image_folder(root, size=8)
    assert len(labels) == 6


def test_mnist_missing_offline_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tvm

    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm.MNIST, "download", offline)
    dm = MNISTDataModule(root=str(tmp_path / "nodata"))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert str(tmp_path / "nodata" / "MNIST" / "raw") in msg
    assert "DATA_DIR" in msg and "experiment=shapes_demo" in msg and "name resolution" in msg


def test_cifar_missing_offline_mentions_the_jpeg_tree(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError, match="cifar10-jpg"):
        dm.setup("fit")


def test_train_py_reports_missing_data_without_a_traceback(tmp_path):
    env = dict(os.environ, DATA_DIR=str(tmp_path / "empty"), CONVLENS_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "train.py", "datamodule.download=false", "callbacks=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "convlens: DataError" in r.stderr and "DATA_DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_mnist_from_data_dir(shared_data):
    before = snapshot(shared_data / "MNIST")
    dm = MNISTDataModule(root=str(shared_data))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert dm.train_set.images.shape[1:] == (1, 28, 28)
    assert dm.probe_batch()[1].tolist() == list(range(10))
    assert snapshot(shared_data / "MNIST") == before


@pytest.mark.slow
def test_cifar10_from_jpeg_tree(shared_data):
    if not (shared_data / "cifar10-jpg").is_dir():
        pytest.skip("no cifar10-jpg under DATA_DIR")
    dm = CIFAR10DataModule(root=str(shared_data))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45000, 5000, 10000)
    assert dm.test_set.labels.bincount().tolist() == [1000] * 10
