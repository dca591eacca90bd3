"""Every option of every config group composes and instantiates; the grid axes are plain keys."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg

GROUPS = ["model", "datamodule", "callbacks", "trainer", "logger", "experiment", "debug"]


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert {"lenet", "cifar_convnet", "blog_convnet", "vgg16"} <= set(options("model"))
    assert {"mnist", "cifar10", "imagefolder", "shapes"} <= set(options("datamodule"))
    assert {"default", "none"} <= set(options("callbacks"))
    assert {"lenet_mnist", "cifar10_convnet", "vgg16_finetune", "shapes_demo"} <= set(options("experiment"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_instantiate_model(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", "model.weights=null"] if experiment == "vgg16_finetune"
                      else [f"experiment={experiment}"], tmp_path)
    model = instantiate(cfg.model)
    x = torch.zeros(2, cfg.datamodule.channels, cfg.datamodule.image_size, cfg.datamodule.image_size)
    assert model(x).shape == (2, cfg.datamodule.num_classes)
    assert cfg.trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("model", options("model"))
def test_every_model_option_instantiates_on_shapes(model, tmp_path):
    c, s = (1, 28) if model == "lenet" else (3, 32)
    overrides = ["experiment=shapes_demo", f"model={model}", f"datamodule.channels={c}", f"datamodule.image_size={s}"]
    cfg = compose_cfg(overrides, tmp_path)
    module = instantiate(cfg.model)
    assert module(torch.zeros(1, c, s, s)).shape == (1, 10)
    opt = module.configure_optimizers()
    assert opt is not None


@pytest.mark.parametrize("datamodule", ["mnist", "cifar10", "shapes"])
def test_datamodule_options_instantiate(datamodule, tmp_path):
    cfg = compose_cfg([f"datamodule={datamodule}"], tmp_path)
    dm = instantiate(cfg.datamodule)
    assert dm.batch_size == cfg.datamodule.batch_size


def test_imagefolder_option_composes_with_root(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    cfg = compose_cfg(["datamodule=imagefolder", f"datamodule.root={tmp_path / 'data'}"], tmp_path)
    assert cfg.datamodule.root == str(tmp_path / "data")


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_compose(trainer, tmp_path):
    cfg = compose_cfg([f"trainer={trainer}"], tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if trainer in ("default", "cpu"):
        t = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_progress_bar=False)
        assert t.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callback_options_instantiate(callbacks, tmp_path):
    from convlens.train import instantiate_dict

    cfg = compose_cfg([f"callbacks={callbacks}"], tmp_path)
    cbs = instantiate_dict(cfg.callbacks)
    names = {type(c).__name__ for c in cbs}
    if callbacks == "model_checkpoint":  # the best epoch, and last.ckpt rewritten every epoch
        assert [(type(c).__name__, c.monitor) for c in cbs] == [("ModelCheckpoint", "val/acc"),
                                                                 ("ModelCheckpoint", None)]
        return
    if callbacks == "all":  # every method's callback (tests/test_methods.py checks the list)
        assert len(cbs) > 1 and "ModelCheckpoint" not in names
        return
    if callbacks not in ("default", "none"):  # one file per callback: exactly that callback
        assert len(cbs) == 1
        return
    assert "ModelCheckpoint" in names
    if callbacks == "none":
        from convlens.callbacks.base import VisualizationCallback
        assert not any(isinstance(c, VisualizationCallback) for c in cbs)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options(logger, tmp_path):
    from convlens.train import instantiate_dict

    cfg = compose_cfg([f"logger={logger}"], tmp_path)
    loggers = instantiate_dict(cfg.get("logger"))
    assert [type(lg).__name__ for lg in loggers] == (["TensorBoardLogger"] if logger == "tensorboard" else [])
    if loggers:
        assert Path(loggers[0].log_dir) == tmp_path / "tensorboard"


def test_grid_axes_are_plain_model_keys(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_convnet", "model.c3=64", "model.c4=32"], tmp_path)
    net = instantiate(cfg.model).net
    assert net.conv3.out_channels == 64 and net.conv4.out_channels == 32
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 217_258


def test_lenet_on_color_32px_data_is_a_clear_error(tmp_path):
    cfg = compose_cfg(["experiment=shapes_demo", "datamodule.channels=3", "datamodule.image_size=32"], tmp_path)
    with pytest.raises(Exception, match="28x28"):
        instantiate(cfg.model)


def test_overrides_reach_the_trainer(tmp_path):
    cfg = compose_cfg(["++trainer.limit_train_batches=3", "trainer.max_epochs=7"], tmp_path)
    assert cfg.trainer.limit_train_batches == 3 and cfg.trainer.max_epochs == 7


# -- config hygiene: the default experiment does not leak into other runs --------------------------

def test_default_run_is_lenet_mnist_with_its_reference_recipe(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.model.net._target_ == "convlens.models.lenet.LeNet"
    assert cfg.datamodule._target_ == "convlens.datamodules.mnist.MNISTDataModule"
    assert cfg.model.optimizer._target_ == "torch.optim.SGD" and cfg.model.optimizer.lr == 0.01
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs == 10
    assert cfg.task_name == "lenet"


def test_overriding_model_and_data_takes_nothing_from_lenet(tmp_path):
    cfg = compose_cfg(["model=cifar_convnet", "datamodule=cifar10"], tmp_path)
    assert cfg.model.scheduler is None                       # cifar_convnet's own: none
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 1e-4
    assert cfg.task_name == "cifar_convnet"                  # not logs/lenet_mnist/
    assert cfg.datamodule.batch_size == 64 and cfg.datamodule.normalization == "channel"


def test_experiments_set_only_what_they_name(tmp_path):
    # the same model with and without a recipe: identical but for what the recipe sets
    plain = OmegaConf.to_container(compose_cfg(["model=lenet"], tmp_path).model, resolve=True)
    recipe = OmegaConf.to_container(compose_cfg(["experiment=lenet_mnist"], tmp_path).model, resolve=True)
    assert plain == recipe
    matconvnet = compose_cfg(["experiment=lenet_mnist_matconvnet"], tmp_path)
    assert matconvnet.model.scheduler is None and matconvnet.model.optimizer.lr == 0.001
    assert compose_cfg(["experiment=shapes_demo"], tmp_path).task_name == "shapes_demo"


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_group(debug, tmp_path):
    from convlens.config import instantiate_dict

    cfg = compose_cfg([f"debug={debug}", "experiment=shapes_demo"], tmp_path)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs == 1
    assert cfg.task_name == "debug"
    names = {type(c).__name__ for c in instantiate_dict(cfg.callbacks)}
    assert "RichProgressBar" not in names and "DeconvProjection" in names
    if debug == "limit":
        assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (2, 1)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=instantiate_dict(cfg.callbacks))
    assert not trainer.progress_bar_callback


@pytest.mark.slow
def test_debug_limit_run_logs_every_default_callback(tmp_path):
    from convlens.events import read_events
    from convlens.methods import METHODS
    from convlens.train import train

    train(compose_cfg(["experiment=shapes_demo", "debug=limit", "datamodule.n_train=256", "datamodule.val_size=64",
                       "datamodule.n_test=64"], tmp_path))
    events = read_events(tmp_path / "tensorboard")
    for method in (m for m in METHODS.values() if m.default):
        assert f"viz_time/{method.name}" in events["scalars"], method.name
        assert any(tag.startswith(method.name) for tag in events["images"]), method.name
