"""The callbacks as plugins of a user's own Lightning project (callbacks/base.py): probe images from
an argument, a datamodule or the validation dataloader; batch formats; the display normalization
and class names found on their own; the LightningModule itself as the network; layers a method
cannot use; the step images land on.

Oracles: probe images against a naive first-of-each-class scan of the dataset; normalization
against the `Normalize` put in the transforms; event-file steps against the steps Lightning logs
`val/acc` at, read back from the same files.
"""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from convlens.callbacks import DecodedFilters, DeconvProjection, FilterEvolution, OcclusionSensitivity, Saliency
from convlens.callbacks.probe import split_batch
from convlens.errors import ConfigError
from convlens.events import read_events
from convlens.viz.layers import LayerError

NUM_CLASSES = 4


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # reused, as torchvision's BasicBlock

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.layer1 = Block(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)  # after the residual sum: off the chain
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))

    def forward(self, x):
        return self.head(self.conv2(self.layer1(self.pool(self.relu(self.conv1(x))))))


class UserModule(pl.LightningModule):
    """What a user writes: the network in `self.model`, forward, steps, optimizer."""

    def __init__(self, dict_batches: bool = False, with_forward: bool = True):
        super().__init__()
        self.model = TinyResNet()
        self.dict_batches = dict_batches

    def forward(self, x):
        return self.model(x)

    def _xy(self, batch):
        return (batch["pixels"], batch["target"]) if self.dict_batches else (batch[0], batch[1])

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class NoForward(UserModule):
    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def data(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.tensor([3, 3, 1, 0, 1, 2] * (n // 6))
    return images, labels


class DictDataset(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixels": self.images[i], "target": int(self.labels[i])}


class Normalized(Dataset):
    """A dataset with torchvision transforms (a Normalize inside) and class names."""
    classes = ["ant", "bee", "cat", "dog"]

    def __init__(self, images, labels, mean, std):
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.Lambda(lambda x: x), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def trainer(tmp_path, callbacks, max_epochs=1, logger=False, **kwargs):
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=max_epochs,
                      callbacks=callbacks, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=1, **kwargs)


def capture(cb):
    logged = {}
    cb.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image)
    return logged


def first_of_each_class(images, labels, per_class=1, limit=10):
    """The naive oracle: scan in order, keep the first `per_class` of each class (classes in order
    of first appearance, at most `limit`), then sort by class."""
    order, kept = [], {}
    for i, y in enumerate(labels.tolist()):
        if y not in kept and len(kept) < limit:
            kept[y] = []
            order.append(y)
        if y in kept and len(kept[y]) < per_class:
            kept[y].append(i)
    index = [i for y in sorted(kept) for i in kept[y]]
    return images[index], labels[index]


# -- probe images from the validation loader ----------------------------------------------------

@pytest.mark.parametrize("per_class, num_probe", [(1, None), (2, None), (1, 3)])
def test_probe_from_the_validation_loader_is_one_per_class(tmp_path, per_class, num_probe):
    images, labels = data()
    cb = DeconvProjection(k=2, max_units=4, val_images=8, num_probe=num_probe, probe_per_class=per_class)
    logged = capture(cb)
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)  # classes spread over batches
    trainer(tmp_path, [cb]).fit(UserModule(), loader, loader)
    want_images, want_labels = first_of_each_class(images, labels, per_class, num_probe or 10)
    assert torch.equal(cb.probe_labels, want_labels)
    assert torch.equal(cb.probe_images, want_images)
    # layer names as print(model) shows them, relative to the LightningModule
    assert cb.layers == ["model.conv1", "model.layer1.conv1", "model.layer1.conv2", "model.conv2"]
    assert {"deconv/model.conv2", "deconv_max/model.conv2"} <= set(logged)


def test_probe_is_kept_in_the_checkpoint(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    first = FilterEvolution(num_probe=2)
    t = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, callbacks=[first], logger=False,
                   enable_progress_bar=False, enable_model_summary=False)
    t.fit(UserModule(), loader, loader)
    ckpt = tmp_path / "one.ckpt"
    t.save_checkpoint(ckpt)
    # the resumed run sees other validation data, but keeps the probe images of the first
    other_images, other_labels = data(seed=1)
    second = FilterEvolution(num_probe=2)
    other = DataLoader(TensorDataset(other_images, other_labels), batch_size=8)
    trainer(tmp_path, [second], max_epochs=2).fit(UserModule(), loader, other, ckpt_path=ckpt)
    assert torch.equal(second.probe_images, first.probe_images)
    assert torch.equal(second.probe_labels, first.probe_labels)


def test_dict_batches_with_configured_keys(tmp_path):
    images, labels = data()
    loader = DataLoader(DictDataset(images, labels), batch_size=8)
    cb = DeconvProjection(k=1, max_units=2, val_images=4, num_probe=2, batch_keys=("pixels", "target"))
    logged = capture(cb)
    trainer(tmp_path, [cb]).fit(UserModule(dict_batches=True), loader, loader)
    want_images, want_labels = first_of_each_class(images, labels, 1, 2)
    assert torch.equal(cb.probe_images, want_images) and torch.equal(cb.probe_labels, want_labels)
    assert "deconv_max/model.conv1" in logged  # the validation batch was read with the same keys


def test_a_batch_it_cannot_read_switches_the_callback_off_at_fit_start_naming_it(tmp_path):
    """Batches it cannot read, with no batch_keys given: the callback is switched off with one
    warning naming what was found and what to pass; the user's training goes on (issue: no
    visualization ever stops a user's training). With batch_keys given (an explicit choice) that
    do not fit, fit stops at fit start, before any batch trains."""
    images, labels = data()
    loader = DataLoader(DictDataset(images, labels), batch_size=8)
    cb = DeconvProjection()
    t = trainer(tmp_path, [cb])
    with pytest.warns(UserWarning, match=r"keys \['pixels', 'target'\].*batch_keys=\(image_key, label_key\)"):
        t.fit(UserModule(dict_batches=True), loader, loader)
    assert cb.declined and t.global_step > 0
    t = trainer(tmp_path, [DeconvProjection(batch_keys=("image", "label"))])
    with pytest.raises(ConfigError, match=r"keys \['pixels', 'target'\].*batch_keys=\(image_key, label_key\)"):
        t.fit(UserModule(dict_batches=True), loader, loader)
    assert t.global_step == 0
    with pytest.raises(ConfigError, match="is a str"):
        split_batch("images", None, "validation batch #0")
    with pytest.raises(ConfigError, match=r"float tensor \[N, C, H, W\].*torch.uint8"):
        split_batch((torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2)), None)


def test_image_only_batches_get_the_predicted_class(tmp_path):
    images, _ = data()
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=8)
    cb = Saliency(num_probe=3)
    capture(cb)
    module = UserModule()
    t = trainer(tmp_path, [cb])
    t.fit(module, loader, loader)
    # probe= with images only: labels None, filled with the current predictions when drawn
    bare = DeconvProjection(probe=images[:3])
    bare._choose_probe(t, module)
    assert bare.probe_labels is None
    _, predicted = bare.probe(module)
    with torch.no_grad():
        assert torch.equal(predicted, module.eval()(images[:3]).argmax(1))


# -- probe= argument ------------------------------------------------------------------------------

def test_probe_argument_beats_datamodule_and_loader(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    given = torch.randn(2, 3, 16, 16)
    as_tensor = OcclusionSensitivity(probe=(given, torch.tensor([1, 2])), num_probe=None)
    as_dataset = DeconvProjection(probe=TensorDataset(images[6:], labels[6:]), k=1, max_units=2, val_images=4)
    capture(as_tensor), capture(as_dataset)
    trainer(tmp_path, [as_tensor, as_dataset]).fit(UserModule(), loader, loader)
    assert torch.equal(as_tensor.probe_images, given) and as_tensor.probe_labels.tolist() == [1, 2]
    want_images, want_labels = first_of_each_class(images[6:], labels[6:])
    assert torch.equal(as_dataset.probe_images, want_images) and torch.equal(as_dataset.probe_labels, want_labels)


@pytest.mark.parametrize("probe, match", [(torch.zeros(2, 16, 16), r"\[N, C, H, W\]"),
                                          ((torch.zeros(2, 3, 4, 4), torch.zeros(3)), "one class index per image"),
                                          ("images/", "probe must be")])
def test_bad_probe_argument(probe, match):
    with pytest.raises(ConfigError, match=match):
        DeconvProjection(probe=probe)


# -- normalization and class names -------------------------------------------------------------

def test_normalization_and_class_names_come_from_the_dataset(tmp_path):
    images, labels = data()
    pixels = images.sigmoid()  # the "pixels" in [0, 1] the transforms normalize
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    dataset = Normalized(pixels, labels, mean, std)
    loader = DataLoader(dataset, batch_size=8)
    cb = DeconvProjection(k=1, max_units=2, val_images=4, num_probe=2)
    logged = capture(cb)
    t = trainer(tmp_path, [cb])
    t.fit(UserModule(), loader, loader)
    norm = cb.normalization(t)
    want_pixels, want_labels = first_of_each_class(pixels, labels, 1, 2)
    torch.testing.assert_close(norm.inverse(cb.probe_images), want_pixels)
    assert cb.class_names(t) == Normalized.classes
    assert cb.captions(t, cb.probe_labels) == [Normalized.classes[y] for y in want_labels]
    # explicit mean/std win over what the dataset says
    explicit = DeconvProjection(mean=[0.0, 0.0, 0.0], std=[2.0, 2.0, 2.0])
    torch.testing.assert_close(explicit.normalization(t).inverse(torch.ones(1, 3, 1, 1)), torch.full((1, 3, 1, 1), 2.0))
    assert "deconv/model.conv1" in logged


def test_no_normalization_anywhere_warns_once_and_shows_images_as_they_are(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    cb = OcclusionSensitivity(num_probe=1)
    capture(cb)
    t = trainer(tmp_path, [cb])
    with pytest.warns(UserWarning, match="no normalization found.*shown as they are.*mean=") as record:
        t.fit(UserModule(), loader, loader)
    assert sum("no normalization" in str(w.message) for w in record) == 1
    assert cb.normalization(t) is None
    assert cb.class_names(t) == []  # captions show the label index


@pytest.mark.parametrize("mean, std, match", [([0.5], None, "both mean and std"),
                                              ([0.5, 0.5], [0.1, 0.0], "std > 0")])
def test_bad_mean_std(mean, std, match):
    with pytest.raises(ConfigError, match=match):
        DeconvProjection(mean=mean, std=std)


# -- models a method cannot use -------------------------------------------------------------------

def test_default_decoded_filters_use_the_chain_prefix_and_name_the_rest(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    cb = DecodedFilters(num_probe=2)
    logged = capture(cb)
    with pytest.warns(UserWarning, match="skipping default layers.*: model.conv2 .*drawing model.conv1, "
                                         "model.layer1.conv1, model.layer1.conv2"):
        trainer(tmp_path, [cb]).fit(UserModule(), loader, loader)
    assert cb.layers == ["model.conv1", "model.layer1.conv1", "model.layer1.conv2"]
    assert set(logged) == {f"decoded{kind}/{layer}" for kind in ("", "_threshold") for layer in cb.layers}


def test_an_explicit_layer_the_method_cannot_use_fails_at_setup_with_the_usable_ones(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    t = trainer(tmp_path, [DecodedFilters(layers=["model.conv2"])])
    with pytest.raises(LayerError, match="'model.conv2' cannot be decoded.*Decodable layers: model.conv1, "
                                         "model.layer1.conv1, model.layer1.conv2$"):
        t.fit(UserModule(), loader, loader)
    assert t.global_step == 0
    t = trainer(tmp_path, [Saliency(layer="model.head.1")])
    with pytest.raises(LayerError, match="cannot be used: it outputs .*Usable layers: model.conv1, model.relu"):
        t.fit(UserModule(), loader, loader)
    assert t.global_step == 0


def test_a_module_without_forward_switches_the_callbacks_off_and_fit_finishes(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    callbacks = [DeconvProjection(), OcclusionSensitivity()]
    logged = [capture(cb) for cb in callbacks]
    t = trainer(tmp_path, callbacks)
    with pytest.warns(UserWarning, match="switched off for this model: NoForward defines no forward"):
        t.fit(NoForward(), loader, loader)
    assert t.global_step == len(loader) and logged == [{}, {}]
    assert all(cb.declined for cb in callbacks)


# -- the step images land on ------------------------------------------------------------------------

def test_images_and_viz_time_land_on_the_epochs_validation_step(tmp_path):
    images, labels = data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)  # 6 steps an epoch
    callbacks = [DeconvProjection(num_probe=2, k=1, max_units=2, val_images=4), FilterEvolution(num_probe=2),
                 OcclusionSensitivity(num_probe=1, every_n_epochs=0)]
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks, max_epochs=3, logger=logger).fit(UserModule(), loader, loader)
    events = read_events(tmp_path / "tb")
    val_steps = sorted(events["scalars"]["val/acc"])
    assert val_steps == [5, 11, 17]
    for tag in ("deconv/model.conv1", "deconv_max/model.layer1.conv2", "evolution/model.layer1.conv1",
                "evolution/weights_model.conv1"):
        assert sorted(events["images"][tag]) == val_steps, tag
    for tag in ("viz_time/deconv", "viz_time/evolution", "evolution_weight_change/model.conv1"):
        assert sorted(events["scalars"][tag]) == val_steps, tag
    # at fit end: the last epoch's step
    assert events["images"]["evolution/summary"] == [val_steps[-1]]
    assert events["images"]["occlusion/0"] == [val_steps[-1]]
    assert events["scalars"]["viz_time/occlusion"] == [val_steps[-1]]


def test_a_dataset_sorted_by_class_still_gives_one_image_per_class(tmp_path):
    """An image folder lists its labels (`targets`) and is sorted by class: the probe is read from
    the labels, not from the first batches (which hold one class)."""
    images = torch.randn(40, 3, 16, 16)
    labels = torch.arange(4).repeat_interleave(10)

    class Sorted(TensorDataset):
        targets = labels.tolist()

    loader = DataLoader(Sorted(images, labels), batch_size=4)
    cb = OcclusionSensitivity(num_probe=None)
    capture(cb)
    trainer(tmp_path, [cb]).fit(UserModule(), loader, loader)
    assert cb.probe_labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(cb.probe_images, images[[0, 10, 20, 30]])
    # through a Subset too
    subset = torch.utils.data.Subset(Sorted(images, labels), list(range(5, 40)))
    cb = OcclusionSensitivity(num_probe=2)
    capture(cb)
    trainer(tmp_path, [cb]).fit(UserModule(), loader, DataLoader(subset, batch_size=4))
    assert cb.probe_labels.tolist() == [0, 1] and torch.equal(cb.probe_images, images[[5, 10]])
