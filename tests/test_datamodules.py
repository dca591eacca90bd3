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


# -- image folders need only their root ------------------------------------------------------------

def write_gray_folder(root, classes=("bag", "coat", "shoe"), per_class=10, size=20, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return root


def test_imagefolder_infers_classes_channels_and_the_models_image_size(tmp_path):
    from conftest import compose_cfg
    from hydra.utils import instantiate

    write_gray_folder(tmp_path / "fashion" / "train")
    for model, size in (("lenet", 28), ("cifar_convnet", 32)):
        cfg = compose_cfg(["datamodule=imagefolder", f"datamodule.root={tmp_path / 'fashion'}", f"model={model}"],
                          tmp_path / "run")
        assert (cfg.datamodule.num_classes, cfg.datamodule.channels, cfg.datamodule.image_size) == (3, 1, size)
        net = instantiate(cfg.model).net
        assert net(torch.zeros(2, 1, size, size)).shape == (2, 3)
    # an RGB folder gives 3 channels; explicit values win over what is read off the folder
    write_folder(tmp_path / "rgb" / "train", per_class=4)
    cfg = compose_cfg(["datamodule=imagefolder", f"datamodule.root={tmp_path / 'rgb'}"], tmp_path / "run")
    assert (cfg.datamodule.num_classes, cfg.datamodule.channels) == (2, 3)
    cfg = compose_cfg(["datamodule=imagefolder", f"datamodule.root={tmp_path / 'fashion'}", "datamodule.channels=3",
                       "datamodule.image_size=16"], tmp_path / "run")
    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    assert dm.train_set.images.shape[1:] == (3, 16, 16) and dm.class_names == ("bag", "coat", "shoe")


def test_imagefolder_contradictions_are_one_line_before_decoding(tmp_path, monkeypatch):
    import convlens.datamodules.images as images_mod

    root = tmp_path / "fashion"
    write_gray_folder(root / "train")
    monkeypatch.setattr(images_mod, "_decode", lambda *a: pytest.fail("decoded before the contradiction was found"))
    with pytest.raises(DataError, match=r"has 3 class folders \(bag, coat, shoe\) but num_classes=10"):
        ImageFolderDataModule(root=str(root), num_classes=10)
    with pytest.raises(DataError,
                       match="normalization=imagenet needs 3-channel images.*grayscale.*normalization=channel"):
        ImageFolderDataModule(root=str(root), normalization="imagenet", image_size=28)


@pytest.mark.slow
def test_train_py_on_a_new_image_folder_with_only_its_root(tmp_path):
    from conftest import compose_cfg
    from convlens.events import read_events
    from convlens.train import train

    write_gray_folder(tmp_path / "fashion" / "train", per_class=30, size=28)
    metrics = train(compose_cfg(["datamodule=imagefolder", f"datamodule.root={tmp_path / 'fashion'}", "debug=limit"],
                                tmp_path / "run"))
    assert 0 <= metrics["test/acc"] <= 1
    images = read_events(tmp_path / "run" / "tensorboard")["images"]
    assert "deconv/conv1" in images and "occlusion/0" in images


def test_train_only_folder_holds_out_a_disjoint_deterministic_test_split(tmp_path):
    from convlens.viz.top_activations import content_ids

    root = tmp_path / "only_train"
    write_folder(root / "train", classes=("a", "b", "c"), per_class=30, size=8)
    dms = [ImageFolderDataModule(root=str(root), image_size=8, val_size=0.2, test_size=0.1) for _ in range(2)]
    for dm in dms:
        dm.setup("fit")
    a, b = dms
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (63, 18, 9)
    assert torch.equal(a.test_set.images, b.test_set.images) and torch.equal(a.val_set.images, b.val_set.images)
    ids = {name: set(content_ids(getattr(a, f"{name}_set").images).tolist()) for name in ("train", "val", "test")}
    assert len(ids["test"]) == 9 and not ids["test"] & ids["train"] and not ids["test"] & ids["val"]
    assert not ids["val"] & ids["train"]
    assert a.test_source == "held out of train/"
    # with a test/ folder it is the test split, and nothing is held out for it
    write_folder(root / "test", classes=("a", "b", "c"), per_class=2, size=8, seed=5)
    c = ImageFolderDataModule(root=str(root), image_size=8, val_size=0.2)
    c.setup("fit")
    assert (len(c.train_set), len(c.test_set), c.test_source) == (72, 6, "test/")


def test_an_empty_class_folder_warns(tmp_path):
    root = tmp_path / "d"
    write_folder(root / "train", classes=("cat", "dog"), per_class=3, size=8)
    (root / "train" / "emu").mkdir()
    with pytest.warns(UserWarning, match="emu.*hold no image"):
        dm = ImageFolderDataModule(root=str(root), num_classes=3, image_size=8)
    assert dm.num_classes == 3


# -- torchvision's MNIST-format datasets by name -----------------------------------------------------

def write_idx(path, array):
    """An idx file as LeCun's format defines it (written here, independently of the reader)."""
    import gzip
    import struct

    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    array = np.asarray(array)
    array = array.astype(">i4") if array.dtype.kind == "i" and array.dtype.itemsize > 1 else array.astype(np.uint8)
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("dataset, gz", [("FashionMNIST", True), ("KMNIST", False), ("QMNIST", True),
                                         ("EMNIST", True)])
def test_mnist_family_from_raw_files_gzipped_or_not(dataset, gz, tmp_path):
    from convlens.datamodules.mnist import raw_files

    rng = np.random.default_rng(0)
    n_classes = 47 if dataset == "EMNIST" else 10
    arrays = {}
    for split, n in (("train", 60), ("test", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % n_classes
        names = raw_files(dataset, split)
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / dataset / "raw" / (names[0] + suffix), images)
        # QMNIST's labels are int rows of metadata, the class first
        write_idx(tmp_path / dataset / "raw" / (names[1] + suffix),
                  np.stack([labels] + [rng.integers(0, 9, n)] * 7, 1).astype(">i4") if dataset == "QMNIST" else labels)
        arrays[split] = (images, labels)
    dm = MNISTDataModule(root=str(tmp_path), dataset=dataset, val_size=10, download=False)
    dm.setup("fit")
    images, labels = arrays["test"]
    expected = images.transpose(0, 2, 1) if dataset == "EMNIST" else images  # EMNIST is stored transposed
    # the split is shuffled: compare the (image, label) pairs as multisets
    got = sorted((img.numpy().tobytes(), int(y)) for img, y in zip(dm.test_set.images, dm.test_set.labels))
    want = sorted((img[None].tobytes(), int(y)) for img, y in zip(expected, labels))
    assert got == want
    assert len(dm.class_names) == dm.num_classes == n_classes
    if dataset == "FashionMNIST":
        assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"


@pytest.mark.slow
def test_gzipped_mnist_equals_torchvisions_reading(shared_data, tmp_path):
    import gzip
    import shutil

    from torchvision.datasets import MNIST

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (shared_data / "MNIST" / "raw").iterdir():
        if f.name.startswith("t10k"):
            with f.open("rb") as src, gzip.open(raw / (f.name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    from convlens.datamodules.mnist import read_idx

    oracle = MNIST(str(shared_data), train=False, download=False)
    assert torch.equal(read_idx(raw / "t10k-images-idx3-ubyte.gz"), oracle.data)
    assert torch.equal(read_idx(raw / "t10k-labels-idx1-ubyte.gz").long(), oracle.targets)


def test_mnist_family_missing_names_the_files_it_expects(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "none"), dataset="KMNIST", download=False)
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "plain or .gz" in msg
    assert str(tmp_path / "none" / "KMNIST" / "raw") in msg
    with pytest.raises(DataError, match="FashionMNIST has 10 classes, but num_classes=7"):
        MNISTDataModule(dataset="FashionMNIST", num_classes=7)
    with pytest.raises(DataError, match="Unknown dataset='Fashion'.*FashionMNIST"):
        MNISTDataModule(dataset="Fashion")


@pytest.mark.parametrize("name, dataset, classes", [("fashion_mnist", "FashionMNIST", 10), ("kmnist", "KMNIST", 10),
                                                    ("emnist", "EMNIST", 47), ("qmnist", "QMNIST", 10)])
def test_mnist_family_configs(name, dataset, classes, tmp_path):
    from conftest import compose_cfg
    from hydra.utils import instantiate

    cfg = compose_cfg([f"datamodule={name}"], tmp_path)
    dm = instantiate(cfg.datamodule)
    assert (dm.dataset, dm.num_classes, len(dm.class_names)) == (dataset, classes, classes)
    assert instantiate(cfg.model).net(torch.zeros(1, 1, 28, 28)).shape == (1, classes)


@pytest.mark.slow
def test_train_py_reports_missing_data_once_without_a_traceback_and_keeps_it_in_train_log(tmp_path):
    env = dict(os.environ, DATA_DIR=str(tmp_path / "empty"), CONVLENS_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "train.py", "datamodule.download=false", "callbacks=none",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "convlens: DataError" in r.stderr and "DATA_DIR" in r.stderr and "Traceback" not in r.stderr
    terminal = r.stdout + r.stderr
    assert terminal.count("MNIST was not found") == 1, terminal
    assert "Traceback" not in terminal and "\n  " not in r.stderr.strip().splitlines()[-1]
    assert (tmp_path / "run" / "train.log").read_text().count("MNIST was not found") == 1
