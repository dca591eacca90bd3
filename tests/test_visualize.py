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


def test_your_own_images_with_an_alias_and_an_option_of_a_method_not_selected(shapes_ckpt, tmp_path):
    """`image=<folder>` (the datamodule's size, channels and normalization applied), `method=gradcam`
    (saliency's alias), `callbacks.saliency.alpha=...` without `callbacks=[saliency]` first."""
    from PIL import Image

    from convlens.datamodules.images import read_image_files

    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, where in enumerate([folder / "a.png", folder / "sub" / "b.jpg", folder / "c.png"]):
        pixels = (torch.rand(40 + 10 * i, 30, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(where)
    overrides = ["experiment=shapes_demo", f"ckpt_path={shapes_ckpt}", "method=gradcam", f"image={folder}",
                 "callbacks.saliency.alpha=0.25", "trainer.accelerator=cpu", "datamodule.n_train=640",
                 "datamodule.val_size=128", "datamodule.n_test=128", "++trainer.enable_progress_bar=false",
                 "++trainer.enable_model_summary=false"]
    cfg = compose_cfg(overrides, tmp_path / "out", "visualize")
    from convlens import visualize as visualize_module

    built = []
    original = visualize_module.method_callback

    def spy(cfg, **options):
        built.append(original(cfg, **options))
        return built[-1]

    visualize_module.method_callback = spy
    try:
        files = visualize(cfg)
    finally:
        visualize_module.method_callback = original
    (callback,) = built
    assert type(callback).__name__ == "Saliency" and callback.alpha == 0.25
    # the probe: the three files, read as the datamodule reads images, then normalized as in training
    pixels, read = read_image_files(folder, cfg.datamodule.image_size, cfg.datamodule.channels)
    assert [f.name for f in read] == ["a.png", "c.png", "b.jpg"]  # sorted paths: a.png, c.png, sub/b.jpg
    from hydra.utils import instantiate

    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    assert torch.allclose(callback.probe_images, dm.normalization(pixels))
    assert callback.probe_labels is None  # explained for the predicted class
    assert any(str(f.relative_to(tmp_path / "out" / "png")).startswith("saliency/") for f in files)


def test_the_run_dir_is_beside_the_checkpoint():
    from convlens.config import beside_checkpoint

    assert beside_checkpoint("/r/run1/checkpoints/last.ckpt", "/logs") == "/r/run1/visualize"
    assert beside_checkpoint("/w/weights.pth", "/logs") == "/w/visualize"
    assert beside_checkpoint("", "/logs") == "/logs"


def test_help_lists_every_method_and_its_options(capsys, monkeypatch):
    import sys

    from convlens.config import callback_config
    from convlens.visualize import main

    monkeypatch.setattr(sys, "argv", ["convlens-visualize", "help"])
    main()
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"  {name} " in out
        assert next(k for k in callback_config(name) if k not in ("_target_", "layers", "layer")) in out
    assert "gradcam (saliency)" in out
