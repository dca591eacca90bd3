"""DecodedFilters: what it logs, and that it is the rendering of `viz.decoding` on the right filters.

Oracles: the logged grids are compared with `decode_filters` / `threshold_decoded` output on the
same weights, rendered independently here; the `most_active` choice with a plain forward pass
through the Sequential LeNet; the logged error with `reconstruction_error`.
"""
from __future__ import annotations

import io
import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from convlens.callbacks.decoded import DecodedFilters
from convlens.render import captioned_grid, readable, scale_symmetric
from conftest import FAST_SHAPES, compose_cfg, read_events
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule
from convlens.viz.decoding import decode_filters, reconstruction_error, threshold_decoded
from convlens.train import train
from convlens.viz.layers import LayerError

CONVS = ["conv1", "conv2", "conv3", "conv4"]


def event_images(logdir: Path) -> dict[str, dict[int, torch.Tensor]]:
    """{tag: {step: [3, H, W] uint8 tensor}} decoded from the event files' PNGs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            for e in acc.Images(tag):
                rgb = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
                out.setdefault(tag, {})[e.step] = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    return out


def event_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def as_logged(image: torch.Tensor) -> torch.Tensor:
    """What TensorBoard stores for a float image in [0, 1]: upscaled to a readable width
    (`render.readable`, as every callback logs), x * 255 truncated to uint8."""
    return (readable(image.clamp(0, 1)) * 255).to(torch.uint8)


def assert_same_image(logged: torch.Tensor, expected: torch.Tensor) -> None:
    expected = as_logged(expected)
    assert logged.shape == expected.shape, (logged.shape, expected.shape)
    # float32 rounding may move a value across a truncation boundary: one level of slack
    assert (logged.int() - expected.int()).abs().max() <= 1


def expected_grid(tiles: torch.Tensor, indices, tile_size: int) -> torch.Tensor:
    return captioned_grid(scale_symmetric(tiles), nrow=math.ceil(math.sqrt(len(indices))),
                          captions=[str(i) for i in indices], tile_size=tile_size)


def naive_most_active(net: LeNet, layer: str, images: torch.Tensor, k: int) -> list[int]:
    """Top-k filters by mean (over images) of the spatial max of the conv output: a plain forward
    pass through the Sequential up to the layer."""
    names = [n for n, _ in net.named_children()]
    upto = torch.nn.Sequential(*list(net.children())[: names.index(layer) + 1])
    was_training = net.training
    net.eval()
    with torch.no_grad():
        activity = upto(images).amax(dim=(2, 3)).mean(dim=0)
    net.train(was_training)
    return activity.argsort(descending=True, stable=True)[:k].tolist()


def lenet_module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.1))


def bare_trainer(tmp_path: Path) -> pl.Trainer:
    """A Trainer that is never fitted: just the logger plumbing the callback logs through."""
    return pl.Trainer(logger=TensorBoardLogger(str(tmp_path), name="tb", version=""), accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def ready(cb: DecodedFilters, trainer: pl.Trainer, module: ClassifierModule, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cb.probe_images, cb.probe_labels = torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 10
    cb.setup(trainer, module, "fit")
    return cb.probe_images


@pytest.mark.slow
def test_shapes_demo_logs_decoded_images_and_errors_every_epoch(tmp_path):
    cfg = compose_cfg([a for a in FAST_SHAPES if "rich_progress_bar" not in a]
                      + ["callbacks=[model_checkpoint,decoded]"], tmp_path)
    train(cfg)
    events = read_events(tmp_path / "tensorboard")
    steps = events["images"]["decoded/conv1"]
    assert len(steps) == 2 and steps[0] < steps[1], steps  # one per epoch, at the global step
    for layer in CONVS:
        assert events["images"][f"decoded/{layer}"] == steps
        assert events["images"][f"decoded_threshold/{layer}"] == steps
        assert events["scalars"][f"decoded_error/{layer}"] == steps
    assert events["scalars"]["viz_time/decoded"] == steps
    images = event_images(tmp_path / "tensorboard")["decoded/conv1"]
    assert not torch.equal(images[steps[0]], images[steps[1]])  # the filters were trained in between


def test_logged_grids_are_the_decoded_filters_of_the_chosen_filters(tmp_path):
    module, trainer = lenet_module(), bare_trainer(tmp_path)
    net = module.net
    cb = DecodedFilters(max_units=16, unpool="bilinear", threshold=0.4)
    probe = ready(cb, trainer, module)
    cb.visualize(trainer, module)
    trainer.logger.experiment.flush()
    images = {tag: steps[0] for tag, steps in event_images(tmp_path).items()}
    scalars = event_scalars(tmp_path)

    assert cb.chosen_units["conv4"] is None  # 10 filters <= 16: all of them
    for layer in ["conv1", "conv2", "conv3"]:
        assert cb.chosen_units[layer] == naive_most_active(net, layer, probe, 16)
    for layer in CONVS:
        chosen = cb.chosen_units[layer]
        indices = chosen if chosen is not None else list(range(net.get_submodule(layer).out_channels))
        decoded = decode_filters(net, layer, unpool="bilinear", filters=chosen)
        assert_same_image(images[f"decoded/{layer}"], expected_grid(decoded, indices, cb.tile_size))
        assert_same_image(images[f"decoded_threshold/{layer}"],
                          expected_grid(threshold_decoded(decoded, q=0.4), indices, cb.tile_size))
        error = reconstruction_error(net, layer, probe, unpool="bilinear")[0]
        assert scalars[f"decoded_error/{layer}"][0] == pytest.approx(error, rel=1e-5)

    # the comparison discriminates: the default unpooling draws a different conv3 grid
    chosen = cb.chosen_units["conv3"]
    nearest = expected_grid(decode_filters(net, "conv3", unpool="nearest", filters=chosen), chosen, cb.tile_size)
    assert (images["decoded/conv3"].int() - as_logged(nearest).int()).abs().max() > 1


def test_first_and_explicit_selections_and_all_filters(tmp_path):
    module, trainer = lenet_module(), bare_trainer(tmp_path)
    cb = DecodedFilters(max_units=8, selection="first", units={"conv3": [499, 3, 42]})
    probe = ready(cb, trainer, module)
    net = module.net
    assert cb.units_for(net, "conv1", probe) == list(range(8))
    assert cb.units_for(net, "conv3", probe) == [499, 3, 42]  # explicit: its order, no cap
    assert DecodedFilters(max_units=None).units_for(net, "conv3", probe) is None

    logged = {}
    cb.log_image = lambda trainer, tag, image: logged.__setitem__(tag, image)
    cb.visualize(trainer, module)
    decoded = decode_filters(net, "conv3", filters=[499, 3, 42])
    expected = expected_grid(decoded, [499, 3, 42], cb.tile_size)
    assert torch.allclose(logged["decoded/conv3"], expected, atol=1e-6)


def test_choice_is_kept_across_epochs_and_checkpoints(tmp_path):
    module, trainer = lenet_module(), bare_trainer(tmp_path)
    cb = DecodedFilters(max_units=16)
    probe = ready(cb, trainer, module)
    net = module.net
    first = cb.units_for(net, "conv3", probe)
    torch.manual_seed(123)
    net.conv3.reset_parameters()  # "training" changes which filters are most active...
    assert naive_most_active(net, "conv3", probe, 16) != first
    assert cb.units_for(net, "conv3", probe) == first  # ...but the drawn ones stay the same

    resumed = DecodedFilters(max_units=16)
    resumed.load_state_dict(cb.state_dict())
    assert resumed.units_for(net, "conv3", probe) == first
    assert torch.equal(resumed.probe_images, cb.probe_images)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="nearest, bilinear, bicubic"):
        DecodedFilters(unpool="switches")
    with pytest.raises(ValueError, match="max_units"):
        DecodedFilters(max_units=0)
    with pytest.raises(ValueError, match="most_active, first"):
        DecodedFilters(selection="random")
    with pytest.raises(ValueError, match="units"):
        DecodedFilters(units={"conv3": [-1]})

    module, trainer = lenet_module(), bare_trainer(tmp_path)
    with pytest.raises(LayerError, match="relu3.*ReLU.*conv1, conv2, conv3, conv4"):
        DecodedFilters(layers=["conv1", "relu3"]).setup(trainer, module, "fit")
    with pytest.raises(LayerError, match="conv1, conv2, conv3, conv4"):
        DecodedFilters(layers=["conv9"]).setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="conv2 has 50 units"):
        DecodedFilters(units={"conv2": [50]}).setup(trainer, module, "fit")
    with pytest.raises(LayerError, match="not among the drawn layers"):
        DecodedFilters(layers=["conv1"], units={"conv2": [0]}).setup(trainer, module, "fit")


def test_image_summary_decodes_to_what_add_image_writes(tmp_path):
    # the callbacks' own PNG encoding (faster compression) against SummaryWriter.add_image:
    # the same pixels come back from the event file, gray and color
    from lightning.pytorch.loggers import TensorBoardLogger

    from convlens.events import image_summary

    torch.manual_seed(0)
    images = {"color": torch.rand(3, 37, 50), "gray": torch.rand(1, 20, 31)}
    ours = TensorBoardLogger(tmp_path, name="ours")
    theirs = TensorBoardLogger(tmp_path, name="theirs")
    for tag, image in images.items():
        ours.experiment._get_file_writer().add_summary(image_summary(tag, image), 7)
        theirs.experiment.add_image(tag, image, global_step=7)
    ours.experiment.flush()
    theirs.experiment.flush()
    decoded_ours, decoded_theirs = event_images(tmp_path / "ours"), event_images(tmp_path / "theirs")
    for tag, image in images.items():
        assert torch.equal(decoded_ours[tag][7], decoded_theirs[tag][7])
        expected = (image * 255).to(torch.uint8).expand(3, -1, -1)  # truncated, like add_image
        assert torch.equal(decoded_ours[tag][7], expected)
