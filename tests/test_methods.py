"""One name per method (convlens.methods.METHODS): its callback file, config file and key, callback
`name`, the prefix of every TensorBoard tag it logs, and `convlens-visualize method=<name>` agree."""
from __future__ import annotations

from importlib.resources import files

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg
from convlens.config import CONFIG_MODULE, callback_config, instantiate_dict
from convlens.errors import ConfigError
from convlens.events import read_events
from convlens.methods import METHODS, method
from convlens.train import train


@pytest.mark.parametrize("name", list(METHODS))
def test_file_config_and_callback_share_the_name(name):
    m = METHODS[name]
    assert (ROOT / "callbacks" / f"{name}.py").is_file()
    node = OmegaConf.create(files(CONFIG_MODULE).joinpath("callbacks", f"{name}.yaml").read_text())
    assert list(node) == [name]                                    # callbacks.<name>
    assert node[name]._target_ == f"convlens.callbacks.{name}.{m.callback}"
    callback = instantiate(callback_config(name))
    assert type(callback) is m.callback_class() and callback.name == name
    assert (ROOT / "viz" / f"{m.algorithm}.py").is_file()


def test_default_set_is_the_registrys(tmp_path):
    cfg = compose_cfg(["callbacks=default"], tmp_path)
    names = {getattr(c, "name", None) for c in instantiate_dict(cfg.callbacks)}
    assert names - {None} == {m.name for m in METHODS.values() if m.default}


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ConfigError, match=", ".join(METHODS)):
        method("gradkam")
    with pytest.raises(ConfigError, match="did you mean gradcam"):
        method("gradkam")


def test_aliases_name_their_method():
    assert method("gradcam") is method("guided_backprop") is METHODS["saliency"]
    assert method("deconvnet") is METHODS["deconv"]


@pytest.mark.slow
def test_every_logged_tag_starts_with_its_methods_name(tmp_path):
    # every callback in one short run: each one's tags are <name>/... or <name>_<kind>/...
    train(compose_cfg(["experiment=shapes_demo", "debug=limit", "datamodule.n_train=256", "datamodule.val_size=64",
                       "datamodule.n_test=64", "callbacks=[default,saliency,top_activations,suppression,faithfulness]",
                       "callbacks.suppression.steps=5", "callbacks.faithfulness.num_probe=2",
                       "callbacks.faithfulness.steps=4", "test=false"], tmp_path))
    events = read_events(tmp_path / "tensorboard")
    lightning = ("train/", "val/", "test/", "epoch", "hp/", "hparams")
    tags = [t for kind in ("images", "scalars") for t in events[kind] if not t.startswith(lightning)]
    for tag in tags:
        prefix = tag.split("/", 1)[0]
        if prefix == "viz_time":
            assert tag.split("/", 1)[1].split("_collect")[0] in METHODS, tag
            continue
        assert any(prefix == n or prefix.startswith(n + "_") or prefix in m.other_prefixes
                   for n, m in METHODS.items()), tag
    drawn = [m.name for m in METHODS.values() if m.default] + ["saliency", "top_activations", "suppression",
                                                              "faithfulness"]  # the methods of this run
    for name in drawn:
        assert f"viz_time/{name}" in events["scalars"], name
        assert any(t.startswith(f"{name}/") for t in events["images"]), name


def test_custom_scalars_layout_groups_the_runs_curves(tmp_path):
    """The Custom Scalars layout is written into the run, and every chart's regexes match tags the
    run logged (read back from the event files)."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from convlens.callbacks.layout import LAYOUT

    train(compose_cfg(["experiment=shapes_demo", "debug=limit", "datamodule.n_train=256", "datamodule.val_size=64",
                       "datamodule.n_test=64", "test=false"], tmp_path))
    entries = []
    for events_file in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events_file), size_guidance={"tensors": 0})
        acc.Reload()
        if "custom_scalars__config__" in acc.Tags()["tensors"]:
            entries += acc.Tensors("custom_scalars__config__")
    (entry,) = entries  # written once
    layout = layout_pb2.Layout.FromString(entry.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {title: regexes for cat in LAYOUT.values() for title, (_, regexes) in cat.items()}
    scalars = read_events(tmp_path / "tensorboard")["scalars"]
    for title in ("accuracy", "relative weight change per epoch, by layer",
                  "decoding error (Rafegas & Vanrell, Eq. 3), by layer", "seconds per visualization callback"):
        matched = [t for t in scalars if any(re.fullmatch(r, t) for r in charts[title])]
        assert matched, (title, sorted(scalars))


def test_the_all_group_lists_every_method(tmp_path):
    """conf/callbacks/all.yaml (what convlens-visualize composes, so any method's options can be set)."""
    cfg = compose_cfg(["callbacks=all"], tmp_path)
    assert sorted(cfg.callbacks) == sorted(METHODS)
