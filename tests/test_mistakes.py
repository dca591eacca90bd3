"""Mistakes (callbacks/mistakes.py) and its algorithms (viz/knn.py).

Oracles: a brute-force loop for the batched kNN (distances in float64, ties by the lower index);
torchmetrics' `MulticlassConfusionMatrix` for the confusion matrix; a hand-built data set with
planted label noise (a tight group of training images of class A relabelled B) under a fixed net
whose decisions are known, for what the neighbour disagreement points at; forward hooks that count
every validation image through the net, for "no second pass"; the features of the images under
the validation transform, for the reference bank.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import MulticlassConfusionMatrix

from conftest import NetModule
from convlens.callbacks import Mistakes
from convlens.callbacks import mistakes as mistakes_module
from convlens.errors import ConfigError, ConvlensError
from convlens.viz import knn as K
from convlens.viz.top_activations import content_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


# -- the kNN against a brute-force loop -----------------------------------------------------------
def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str):
    """Every pair's distance in float64 in a Python loop; neighbours sorted by (distance, index)."""
    dist, idx = [], []
    for q in queries.double():
        row = []
        for j, b in enumerate(bank.double()):
            if metric == "cosine":
                nq, nb = q.norm(), b.norm()
                cos = (q @ b) / (nq * nb) if nq > 0 and nb > 0 else torch.tensor(0.0, dtype=torch.float64)
                d = 1 - cos
            else:
                d = (q - b).norm()
            row.append((float(d), j))
        row.sort()
        dist.append([d for d, _ in row[:k]])
        idx.append([j for _, j in row[:k]])
    return torch.tensor(dist, dtype=torch.float64), torch.tensor(idx)


@pytest.mark.parametrize("metric", K.METRICS)
@pytest.mark.parametrize("block", [2**22, 37])  # one block, and blocks of a few rows (chunked bank and queries)
def test_knn_equals_brute_force(metric, block):
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(9, 6, generator=g), torch.randn(53, 6, generator=g)
    d, i = K.knn(queries, bank, 4, metric, block_elements=block)
    d_ref, i_ref = brute_force(queries, bank, 4, metric)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(d.double(), d_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", K.METRICS)
@pytest.mark.parametrize("block", [2**22, 12, 5])
def test_knn_ties_go_to_the_lower_index(metric, block):
    """Features whose distances are exact in float32 and float64 alike (integers; for cosine, the
    signed unit vectors +-e_i, which no two of are parallel, and queries of -1/0/1 entries): many bank
    rows at exactly the same distance, also across blocks and beyond the few extra candidates each
    block fetches."""
    g = torch.Generator().manual_seed(2)
    if metric == "cosine":
        base = torch.cat([torch.eye(3), -torch.eye(3)])
        queries = torch.cat([base[:3], torch.randint(-1, 2, (4, 3), generator=g).float()])
    else:
        base = torch.randint(-2, 3, (6, 3), generator=g).float()
        queries = torch.cat([base[:3], torch.randint(-2, 3, (4, 3), generator=g).float()])
    bank = base[torch.randint(0, 6, (60,), generator=g)]  # each row repeated about 10 times
    for k in (1, 3, 12, 60):
        d, i = K.knn(queries, bank, k, metric, block_elements=block)
        d_ref, i_ref = brute_force(queries, bank, k, metric)
        assert torch.equal(i, i_ref), (k, i, i_ref)
        torch.testing.assert_close(d.double(), d_ref, rtol=1e-5, atol=1e-6)


def test_knn_k_larger_than_the_bank_and_a_zero_vector():
    bank = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    d, i = K.knn(torch.tensor([[1.0, 1.0]]), bank, 10, "cosine")
    assert i.shape == (1, 3) and i.tolist() == [[0, 2, 1]]
    assert d[0, 2] == pytest.approx(1.0)  # the zero vector: distance 1 from everything


def test_knn_never_holds_a_query_by_bank_matrix(monkeypatch):
    shapes = []
    original = K._scores

    def spy(q, b, metric, b_sq):
        shapes.append((q.shape[0], b.shape[0]))
        return original(q, b, metric, b_sq)

    monkeypatch.setattr(K, "_scores", spy)
    K.knn(torch.randn(100, 4), torch.randn(5000, 4), 5, block_elements=4096)
    assert max(q * b for q, b in shapes) <= 4096
    assert sum(q * b for q, b in shapes) == 100 * 5000  # every pair once


def test_knn_bad_input_says_what_to_pass():
    with pytest.raises(K.KnnError, match="Unknown metric='l1'; use one of cosine, euclidean"):
        K.knn(torch.randn(2, 3), torch.randn(4, 3), 1, "l1")
    with pytest.raises(K.KnnError, match="queries have 3 features and the bank 4"):
        K.knn(torch.randn(2, 3), torch.randn(4, 4), 1)
    with pytest.raises(K.KnnError, match="the bank is empty"):
        K.knn(torch.randn(2, 3), torch.randn(0, 3), 1)


# -- counts -------------------------------------------------------------------------------------
def test_confusion_matrix_equals_torchmetrics():
    g = torch.Generator().manual_seed(3)
    preds, labels = torch.randint(0, 7, (500,), generator=g), torch.randint(0, 7, (500,), generator=g)
    matrix = K.confusion_matrix(preds, labels, 7)
    assert torch.equal(matrix, MulticlassConfusionMatrix(num_classes=7)(preds, labels).long())
    expected = torch.tensor([float((preds[labels == c] == c).float().mean()) for c in range(7)])
    torch.testing.assert_close(K.class_accuracy(matrix), expected)
    with pytest.raises(K.KnnError, match="outside 0..6"):
        K.confusion_matrix(preds, labels + 1, 7)


def test_class_accuracy_of_an_absent_class_is_nan():
    acc = K.class_accuracy(K.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3))
    assert acc[0] == 0.5 and math.isnan(acc[1]) and math.isnan(acc[2])


def test_rank_mistakes_and_suspects():
    preds, labels = torch.tensor([1, 1, 0, 2, 2]), torch.tensor([1, 0, 1, 0, 2])
    conf = torch.tensor([0.9, 0.6, 0.8, 0.6, 0.99])
    assert K.rank_mistakes(preds, labels, conf).tolist() == [2, 1, 3]  # 0.8, then the tie 0.6 in order
    neighbours = torch.tensor([[4, 2, 9], [9, 4, 1], [2, 9, 4]])
    disagree = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    rows, counts = K.suspects(neighbours, disagree)
    assert rows.tolist() == [9, 2, 4] and counts.tolist() == [3, 2, 1]  # ties (none here) by the lower row
    assert K.suspects(neighbours, disagree, top=1)[0].tolist() == [9]
    assert K.sprite_capacity(32) == 256 ** 2 and K.sprite_capacity(3000) == 4


# -- features -------------------------------------------------------------------------------------
def lenet_like() -> nn.Module:
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 4, 5), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(4, 8, 12), relu2=nn.ReLU(), conv3=nn.Conv2d(8, 3, 1),
                                     flatten=nn.Flatten()))


@pytest.mark.parametrize("make, image, head", [
    (lambda: torchvision.models.resnet18(num_classes=5), (3, 32, 32), "fc"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), (3, 32, 32), "classifier.3"),
    (lenet_like, (1, 28, 28), "conv3"),  # a 1x1 conv as the classifier, as LeNet's conv4
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(1)),
     (3, 2, 2), "3"),
])
def test_classifier_head_on_torchvision_nets_and_chains(make, image, head):
    torch.manual_seed(0)
    assert K.classifier_head(make(), torch.randn(1, *image)) == head


def test_no_head_is_named():
    with pytest.raises(K.KnnError, match="no module with weights"):
        K.classifier_head(nn.Sequential(nn.Flatten()), torch.randn(1, 3, 2, 2))
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Unflatten(1, (2, 2)), nn.Flatten(1), nn.Linear(4, 4),
                        nn.Flatten(0))
    with pytest.raises(K.KnnError, match="not class scores"):
        K.classifier_head(net, torch.randn(1, 3, 2, 2))


def test_layer_features_default_and_named_layer_and_state_restored():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    net.train()
    net.layer1.eval()  # mixed modes come back as they were
    images = torch.randn(4, 3, 32, 32)
    modes = [m.training for m in net.modules()]
    feats = K.layer_features(net, images)
    with torch.no_grad():
        net.eval()
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        expected = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(x))))), 1)
        maps = net.layer3(net.layer2(net.layer1(x)))
    for m, flag in zip(net.modules(), modes):
        m.training = flag
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(K.layer_features(net, images, "layer3"), maps.mean((2, 3)))
    torch.testing.assert_close(K.layer_features(net, images, "layer3", pool="flatten"), maps.flatten(1))
    assert [m.training for m in net.modules()] == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with torch.inference_mode():
        inside = K.layer_features(net, images.clone())
    torch.testing.assert_close(inside, feats)


def test_layer_features_restores_the_net_after_an_error_inside_its_forward():
    net = torchvision.models.resnet18(num_classes=5)
    net.train()
    handle = net.layer2.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        K.layer_features(net, torch.randn(2, 3, 32, 32), source=K.FeatureSource("fc", "fc", "input"))
    handle.remove()
    assert all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


# -- the callback on a data set with planted label noise ------------------------------------------
A, B, C = 0, 1, 2
PLANTED = [5, 17, 40]  # training rows of class-A images labelled B


def two_feature_images(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """[N, 1, 4, 4] images whose left half is x0 and right half x1 (the net's two features)."""
    img = torch.empty(len(x0), 1, 4, 4)
    img[..., :2], img[..., 2:] = x0.view(-1, 1, 1, 1), x1.view(-1, 1, 1, 1)
    return img


def fixed_net() -> nn.Module:
    """Features (x0, x1) = the halves' means; the head says B where x0 > 1.5 and C where x1 > 2 (as a
    net that learned the planted labels would: its A/B boundary moved into A's territory)."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
        net[2].bias.copy_(torch.tensor([0.0, -3.0, -4.0]))
    return net


def planted_data(noisy: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def cluster(n, lo0, lo1):
        return lo0 + torch.rand(n, generator=g), lo1 + torch.rand(n, generator=g)

    xs, ys = [], []
    for cls, (lo0, lo1) in ((A, (0, 0)), (B, (3, 0)), (C, (0, 3))):
        xs.append(cluster(20, lo0, lo1))
        ys.append(torch.full((20,), cls))
    x0, x1 = torch.cat([x[0] for x in xs]), torch.cat([x[1] for x in xs])
    y = torch.cat(ys)
    perm = torch.randperm(60, generator=g)
    x0, x1, y = x0[perm], x1[perm], y[perm]
    # the planted group: A images just past the boundary, labelled B (noisy) or A (clean)
    x0 = torch.cat([x0[:5], torch.tensor([1.6]), x0[5:16], torch.tensor([1.7]), x0[16:38], torch.tensor([1.8]),
                    x0[38:]])
    x1 = torch.cat([x1[:5], torch.tensor([0.5]), x1[5:16], torch.tensor([0.5]), x1[16:38], torch.tensor([0.5]),
                    x1[38:]])
    label = B if noisy else A
    y = torch.cat([y[:5], torch.tensor([label]), y[5:16], torch.tensor([label]), y[16:38], torch.tensor([label]),
                   y[38:]])
    train = TensorDataset(two_feature_images(x0, x1), y)
    # validation: 10 per class, 4 A images near the planted group (predicted B), one C inside A (predicted A)
    v0, v1, vy = [], [], []
    for cls, (lo0, lo1) in ((A, (0, 0)), (B, (3, 0)), (C, (0, 3))):
        a, b = cluster(10, lo0, lo1)
        v0.append(a), v1.append(b), vy.append(torch.full((10,), cls))
    v0.append(torch.tensor([1.65, 1.72, 1.78, 1.85, 0.5]))
    v1.append(torch.tensor([0.45, 0.55, 0.5, 0.52, 0.5]))
    vy.append(torch.tensor([A, A, A, A, C]))
    val = TensorDataset(two_feature_images(torch.cat(v0), torch.cat(v1)), torch.cat(vy))
    return train, val


Module = partial(NetModule, lr=0.0)  # lr 0: the fixed net stays as built


def fit(tmp_path: Path, callback, train, val, epochs: int = 1, net: nn.Module | None = None, batch_size: int = 16,
        module=None):
    module = module or Module(net or fixed_net())
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                         callbacks=[callback])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=batch_size))
    return module, [str(w.message) for w in record]


def scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_neighbour_disagreement_points_at_the_planted_label_noise(tmp_path):
    results = {}
    for noisy in (True, False):
        train, val = planted_data(noisy)
        cb = Mistakes(k=3, num_suspects=3, metric="euclidean", probe=(train.tensors[0][:3], train.tensors[1][:3]))
        fit(tmp_path / str(noisy), cb, train, val)
        results[noisy] = cb.result
    noisy, clean = results[True], results[False]
    near = [i for i, v in enumerate(noisy["mistake_order"].tolist()) if v in (30, 31, 32, 33)]
    assert len(near) == 4 and len(noisy["mistake_order"]) == 5  # the four near the group, and the C inside A
    # the four mistakes' neighbours are exactly the planted images, all labelled otherwise than the truth
    assert set(noisy["neighbours"][near].flatten().tolist()) == set(PLANTED)
    assert noisy["disagree"][near].all()
    assert set(noisy["suspects"].tolist()) == set(PLANTED) and noisy["suspect_counts"].tolist() == [4, 4, 4]
    # without the noise, the same neighbours agree: only the C inside A disagrees with its A neighbours
    assert clean["disagree"][near].sum() == 0
    assert noisy["disagreement"] == pytest.approx(1.0) and clean["disagreement"] == pytest.approx(3 / 15)
    assert not set(clean["suspects"].tolist()) & set(PLANTED)
    logged = scalars(tmp_path / "True" / "tb")
    assert logged["mistakes/neighbour_disagreement"] == pytest.approx([1.0])  # as in one process (test above)


def test_confusion_matrix_ranking_and_class_accuracy_match_an_independent_pass(tmp_path):
    train, val = planted_data()
    cb = Mistakes(k=2, probe=(train.tensors[0][:3], train.tensors[1][:3]))
    module, _ = fit(tmp_path, cb, train, val, batch_size=7)  # batches that cut the classes
    x, y = val.tensors
    with torch.no_grad():
        probs = module.net(x).softmax(1)
    preds = probs.argmax(1)
    expected = MulticlassConfusionMatrix(num_classes=3)(preds, y).long()
    assert torch.equal(cb.result["confusion"], expected)
    wrong = (preds != y).nonzero().flatten()
    oracle = sorted(wrong.tolist(), key=lambda i: (-float(probs[i].max()), i))
    assert cb.result["mistake_order"].tolist() == oracle
    torch.testing.assert_close(cb.result["mistake_confidence"], probs[oracle].max(1).values)
    logged = scalars(tmp_path / "tb")
    for cls in range(3):
        assert logged[f"mistakes/class_acc/{cls}"] == pytest.approx([float((preds[y == cls] == cls).float().mean())])
    assert logged["mistakes/count"] == [len(oracle)]
    from convlens.events import read_events

    images = read_events(tmp_path / "tb")["images"]
    assert {"mistakes/nearest", "mistakes/suspects", "mistakes/confusion"} <= set(images)


def test_no_extra_forward_over_the_validation_set(tmp_path):
    """Every validation image goes through the net once per validation pass: the callback reads
    Lightning's own pass (the bank's forwards are training images only)."""
    train, val = planted_data()
    val_ids = set(content_ids(val.tensors[0]).tolist())
    train_ids = set(content_ids(train.tensors[0]).tolist())
    net = fixed_net()
    seen: dict[int, int] = {}
    train_forwards = []

    def count(_module, args):
        ids = content_ids(args[0]).tolist()
        for i in ids:
            if i in val_ids:
                seen[i] = seen.get(i, 0) + 1
        train_forwards.append(sum(i in train_ids for i in ids))

    net.register_forward_pre_hook(count)
    cb = Mistakes(k=2, probe=(train.tensors[0][:3], train.tensors[1][:3]))
    fit(tmp_path, cb, train, val, epochs=2, net=net)
    assert cb.result is not None and cb.result["epoch"] == 1
    assert set(seen) == val_ids and set(seen.values()) == {2}  # 2 epochs: twice each, never more
    # and the bank was computed each epoch (63 training images, beyond the 2 x 63 of training)
    assert sum(train_forwards) >= 4 * len(train)


# -- where the bank's images come from ------------------------------------------------------------
class WithTransform(Dataset):
    """A torchvision-style dataset: `transform` applied to each image."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.labels[i]


def augment(x):  # a stand-in for a training-only augmentation, visible in the features
    return x + 100.0


def keep(x):
    return x


@pytest.mark.parametrize("val_has_transform", [True, False])
def test_the_bank_uses_the_validation_transform_where_there_is_one(tmp_path, val_has_transform):
    train, val = planted_data()
    train_t = WithTransform(*train.tensors, transform=augment)
    val_t = WithTransform(*val.tensors, transform=keep) if val_has_transform else val
    cb = Mistakes(k=2, bank_size=20, bank_seed=3, probe=(train.tensors[0][:3], train.tensors[1][:3]))
    module, said = fit(tmp_path, cb, train_t, val_t)
    rows = cb.result["bank_rows"]
    assert torch.equal(rows, torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:20].sort().values)
    reference = cb.reference_source(None, module)
    images, labels = reference.read(rows)
    assert torch.equal(labels, train.tensors[1][rows])
    expected = train.tensors[0][rows] if val_has_transform else augment(train.tensors[0][rows])
    torch.testing.assert_close(images, expected)
    assert train_t.transform is augment  # the user's dataset is left as it was
    warned = [w for w in said if "training transforms" in w]
    assert len(warned) == (0 if val_has_transform else 1)
    assert ("validation dataset's transform" in cb.result["reference"]) == val_has_transform


def test_an_explicit_reference_and_an_offline_run_without_training_data(tmp_path):
    train, val = planted_data()
    net = fixed_net()
    probe = (train.tensors[0][:3], train.tensors[1][:3])
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, logger=TensorBoardLogger(tmp_path, name="tb", version=""))
    bare, given = Mistakes(k=2, probe=probe), Mistakes(k=2, probe=probe, reference=train)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.callbacks.extend([bare, given])
        trainer.validate(Module(net), DataLoader(val, batch_size=16), verbose=False)
    said = [str(w.message) for w in record]
    assert sum("no training data to find neighbours in" in w for w in said) == 1
    assert bare.result["neighbours"] is None and torch.equal(bare.result["confusion"], given.result["confusion"])
    assert given.result["neighbours"].shape == (5, 2) and given.result["reference"] == "reference= (as given)"
    assert not bare.declined and not given.declined


# -- the embedding projector ------------------------------------------------------------------------
def test_projector_files_within_the_sprite_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(mistakes_module, "SPRITE_LIMIT", 16)  # 4-px thumbnails: 16 fit, of 35 images
    train, val = planted_data()
    cb = Mistakes(k=2, projector=True, projector_every_n_epochs=1, projector_image_size=4,
                  probe=(train.tensors[0][:3], train.tensors[1][:3]))
    module, said = fit(tmp_path, cb, train, val)
    assert cb.result["projector"] == {"points": 16, "seen": 35, "sprite_side": 16}
    assert sum("shows 16 of the 35 validation images" in w for w in said) == 1
    logdir = tmp_path / "tb"
    config = (logdir / "projector_config.pbtxt").read_text()
    assert "mistakes/projector" in config and "sprite.png" in config
    (folder,) = [p for p in logdir.glob("*/*") if (p / "tensors.tsv").is_file()]
    tensors = [list(map(float, line.split("\t"))) for line in (folder / "tensors.tsv").read_text().splitlines()]
    metadata = (folder / "metadata.tsv").read_text().splitlines()
    from PIL import Image

    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.size == (16, 16)
    assert metadata[0] == "label\tpredicted" and len(metadata) == 17 and len(tensors) == 16
    # the points: the 16 validation images with the smallest content hashes, each with its features
    x, y = val.tensors
    chosen = content_ids(x).argsort()[:16]
    expected = K.layer_features(module.net, x[chosen])
    torch.testing.assert_close(torch.tensor(tensors), expected)
    preds = module.net(x[chosen]).argmax(1)
    assert metadata[1:] == [f"{int(a)}\t{int(b)}" for a, b in zip(y[chosen], preds)]


def test_projector_without_tensorboard_says_so(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train, val = planted_data()
    cb = Mistakes(k=2, projector=True, projector_every_n_epochs=1, probe=(train.tensors[0][:3], train.tensors[1][:3]))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         logger=CSVLogger(tmp_path), callbacks=[cb])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(Module(fixed_net()), DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    assert sum("needs a TensorBoardLogger" in str(w.message) for w in record) == 1
    assert cb.result is not None and cb.result["projector"] is None


# -- DDP: the ranks' shares merged -------------------------------------------------------------------
def test_merging_two_ranks_with_padding_equals_one_process():
    """DistributedSampler order (rank r holds rows r, r+2, ...), with the last row repeated on rank 1
    as its padding: merged, the same collection as one process over the whole set."""
    train, val = planted_data()
    x, y = val.tensors
    net = fixed_net()

    def collect(rows):
        cb = Mistakes(k=2, num_mistakes=3)
        cb._acc = None
        state = {"preds": [], "labels": [], "confidence": [], "order": [], "ids": [], "classes": 3,
                 "m_features": [], "m_preds": [], "m_labels": [], "m_confidence": [], "m_order": [], "m_ids": [],
                 "top": None, "projector": None, "capacity": 0, "seen": 0, "batches": 0, "skipped": 0,
                 "unlabelled": 0}
        feats = K.layer_features(net, x[rows])
        logits = net(x[rows]).detach()
        conf, preds = logits.softmax(1).max(1)
        wrong = preds != y[rows]
        ids = content_ids(x[rows])
        state.update(preds=[preds], labels=[y[rows]], confidence=[conf], order=[rows], ids=[ids],
                     m_features=[feats[wrong]], m_preds=[preds[wrong]], m_labels=[y[rows][wrong]],
                     m_confidence=[conf[wrong]], m_order=[rows[wrong]], m_ids=[ids[wrong]], seen=len(rows))
        cb._acc = {**state, "dedupe": True}
        cb._keep_top(x[rows][wrong], conf[wrong], rows[wrong])
        state["top"] = cb._acc["top"]
        return Mistakes._finish({**state, "dedupe": True})

    n = len(y)
    rank0 = torch.arange(0, n, 2)
    rank1 = torch.cat([torch.arange(1, n, 2), torch.tensor([n - 1])])  # padded with a repeat
    merged = mistakes_module._merge([collect(rank0), collect(rank1)], 3)
    single = collect(torch.arange(n))
    for key in ("preds", "labels", "confidence", "order", "m_preds", "m_labels", "m_order", "m_features"):
        assert torch.equal(merged[key], single[key]), key
    assert torch.equal(merged["top"]["images"], single["top"]["images"])
    assert merged["seen"] == n


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(metric="manhattan"), "Unknown metric='manhattan'; use one of cosine, euclidean"),
    (dict(k=0), "k (neighbours per mistake) must be an int >= 1, got 0"),
    (dict(pool="max"), "Unknown pool='max'"),
    (dict(projector="yes"), "projector must be true or false"),
    (dict(reference=[1, 2]), "reference must be a Dataset"),
    (dict(projector_image_size=9000), "at most 8192"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError) as error:
        Mistakes(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_layer_fails_at_setup_and_a_named_layer_gives_its_features(tmp_path):
    train, val = planted_data()
    with pytest.raises(ConvlensError, match="conv9"):
        fit(tmp_path / "bad", Mistakes(layer="conv9"), train, val)
    cb = Mistakes(layer="0", pool="flatten", k=2, probe=(train.tensors[0][:3], train.tensors[1][:3]))
    fit(tmp_path / "named", cb, train, val)
    assert cb.source == K.FeatureSource("2", "0", "output") and cb.result["neighbours"] is not None


@pytest.mark.slow
def test_ddp_two_processes_log_what_one_process_logs(tmp_path):
    """ddp_spawn on 2 CPU processes: each rank collects its half of the validation set (the odd count
    makes DDP pad one rank with a repeated image), rank zero merges and draws: the same count of
    mistakes and per-class accuracy as the single-process oracle."""
    import os

    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    train, val = planted_data()
    probe = (train.tensors[0][:3], train.tensors[1][:3])
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=2,
                         strategy="ddp_spawn", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, use_distributed_sampler=True,
                         logger=TensorBoardLogger(tmp_path, name="tb", version=""),
                         callbacks=[Mistakes(k=3, metric="euclidean", probe=probe)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(fixed_net()), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    x, y = val.tensors
    with torch.no_grad():
        preds = fixed_net()(x).argmax(1)
    logged = scalars(tmp_path / "tb")
    assert logged["mistakes/count"] == [float((preds != y).sum())]
    for cls in range(3):
        assert logged[f"mistakes/class_acc/{cls}"] == pytest.approx([float((preds[y == cls] == cls).float().mean())])
    assert logged["mistakes/neighbour_disagreement"] == pytest.approx([1.0])  # as in one process (test above)
