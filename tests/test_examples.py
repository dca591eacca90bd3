"""examples/: the user project runs, for a few batches, and its callbacks log what they should.

Oracle: the event files, read back; the expected tags follow from the model (its default layers,
found independently by `viz.layers.default_conv_layers` and `viz.decoding.decodable_layers`).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

from convlens.events import read_events
from convlens.viz.decoding import decodable_layers
from convlens.viz.layers import default_conv_layers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet_cifar10.py"


def load_example():
    spec = importlib.util.spec_from_file_location("resnet_cifar10", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, *extra):
    example = load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = example.main(["--out", str(tmp_path / "runs"), "--max-epochs", "1", "--batch-size", "8",
                                    "--limit-train-batches", "2", "--limit-val-batches", "1", "--workers", "0",
                                    *extra])
    finally:
        torch.set_num_threads(threads)
    return example, trainer


def check_events(example, trainer, root: Path):
    events = read_events(root)
    assert trainer.global_step == 2
    val_step = events["scalars"]["val/acc"]
    assert val_step == [1]
    net = example.LitResNet()
    image = torch.randn(1, 3, 32, 32)  # not zeros: a zero image hides a residual sum's branch (+0)
    convs = ["model." + name for name in default_conv_layers(net.model, image)]
    decodable = ["model." + name for name in decodable_layers(net.model, image)]
    expected = ([f"deconv/{c}" for c in convs] + [f"deconv_max/{c}" for c in convs]
                + [f"evolution/{c}" for c in convs] + [f"decoded/{c}" for c in decodable]
                + ["evolution/summary", "evolution/weights_model.conv1"]
                + [f"occlusion/{i}" for i in range(4)])
    for tag in expected:
        assert events["images"].get(tag) == val_step, tag
    for name in ("deconv", "evolution", "decoded", "occlusion"):
        assert events["scalars"][f"viz_time/{name}"] == val_step


@pytest.mark.slow
def test_example_runs_offline_with_fake_data(tmp_path, capsys):
    example, trainer = run(tmp_path, "--fake")
    check_events(example, trainer, tmp_path / "runs")
    # the epoch's metrics are printed, with the values the trainer holds
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 1/1: ")]
    assert len(printed) == 1, printed
    metrics = trainer.callback_metrics
    for key, shown in (("val/acc", "val/acc"), ("val/loss", "val/loss"), ("train/loss_epoch", "train/loss"),
                       ("train/acc", "train/acc")):
        assert f"{shown} {float(metrics[key]):.4f}" in printed[0], (key, printed[0])


class SortedByClass(torch.utils.data.Dataset):
    """Like an ImageFolder: items sorted by class, `targets` beside them."""

    def __init__(self, classes: int, per_class: list[int]):
        self.targets = [c for c in range(classes) for _ in range(per_class[c])]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), self.targets[i]  # the image says which item it is


def test_limited_validation_covers_every_class():
    example = load_example()
    per_class = [5, 3, 6, 5, 4, 5, 2, 5, 5, 7]  # unequal, as in a real folder
    dataset = SortedByClass(10, per_class)
    batch_size = 8
    first = -(-10 // batch_size)  # the fewest batches that can hold 10 classes

    def seen(loader, batches):
        return [(int(x[j, 0, 0, 0]), int(y[j])) for x, y in list(loader)[:batches] for j in range(len(y))]

    # the loader without it (sorted, not shuffled) sees the first classes only: what the order fixes
    plain = seen(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False), first)
    assert {c for _, c in plain} == {0, 1, 2, 3}
    balanced = seen(example.val_loader(dataset, batch_size=batch_size), first)
    assert {c for _, c in balanced} == set(range(10))
    # every image once, each with its own label; the same order on every run
    everything = seen(example.val_loader(dataset, batch_size=batch_size), 10 ** 6)
    assert sorted(i for i, _ in everything) == list(range(len(dataset)))
    assert all(dataset.targets[i] == c for i, c in everything)
    assert everything == seen(example.val_loader(dataset, batch_size=batch_size), 10 ** 6)
    # any prefix is as balanced as it can be: class counts differ by at most 1 while every class has items left
    for n in range(1, 2 * 10 + 1):
        counts = [sum(1 for _, c in everything[:n] if c == k) for k in range(10)]
        assert max(counts) - min(counts) <= 1, (n, counts)


@pytest.mark.slow
def test_example_runs_on_the_cifar10_image_folder(tmp_path):
    data = Path(os.environ.get("DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    if not (data / "cifar10-jpg" / "test").is_dir():
        pytest.skip(f"no cifar10-jpg under {data} (set DATA_DIR)")
    example, trainer = run(tmp_path, "--data-dir", str(data))
    check_events(example, trainer, tmp_path / "runs")
    cb = trainer.callbacks[0]
    assert cb.class_names(trainer)[:3] == ["airplane", "automobile", "bird"]  # the folder's classes
    assert cb.normalization(trainer) is not None  # the Normalize of the transforms
