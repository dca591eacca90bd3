"""visualize.py: any method on a saved checkpoint, without training; a mismatched checkpoint is named."""

import pytest
import torch

from conftest import FAST_SHAPES, compose_cfg
from convlens.checkpoints import WeightsError
from convlens.methods import METHODS
from convlens.train import train
from convlens.visualize import visualize


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1", "test=false"], out))
    return out / "checkpoints" / "last.ckpt"


# suppression optimizes an input for hundreds of steps: the long one
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "suppression" else m
                                    for m in METHODS])
def test_each_method_writes_tensorboard_images_and_pngs(method, shapes_ckpt, tmp_path):
    overrides = ["experiment=shapes_demo", f"ckpt_path={shapes_ckpt}", f"method={method}", "trainer.accelerator=cpu",
                 "datamodule.n_train=640", "datamodule.val_size=128", "datamodule.n_test=128",
                 "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
    cfg = compose_cfg(overrides, tmp_path, "visualize")
    files = visualize(cfg)
    rel = [str(f.relative_to(tmp_path / "png")) for f in files]
    assert any(r.startswith(f"{method}/") for r in rel), rel
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_that_does_not_match_the_model_config(tmp_path):
    from convlens.models.cifar import CifarConvNet

    ckpt = tmp_path / "c3_64.pth"
    torch.save(CifarConvNet(64, 32).state_dict(), ckpt)
    cfg = compose_cfg(["experiment=shapes_demo", "model=cifar_convnet", "model.c3=128", "datamodule.channels=3",
                       "datamodule.image_size=32", f"ckpt_path={ckpt}"], tmp_path, "visualize")
    with pytest.raises(WeightsError, match=r"conv3\.weight: file \(64, 64, 3, 3\) vs model \(128, 64, 3, 3\)"):
        visualize(cfg)


def test_unknown_method_lists_the_valid_ones(tmp_path, shapes_ckpt):
    cfg = compose_cfg(["experiment=shapes_demo", f"ckpt_path={shapes_ckpt}", "method=tsne"], tmp_path, "visualize")
    with pytest.raises(ValueError, match="deconv, decoded, occlusion"):
        visualize(cfg)
