"""The names renamed to the glossary's words (docs/glossary.md, "Renamed"): each earlier name still
works for one release, with one deprecation warning naming the new one; both names at once fail in
one line; checkpoints written under the earlier state keys still load."""
from __future__ import annotations

import warnings

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from convlens.callbacks import DecodedFilters, DeconvProjection, FilterEvolution, KernelSuppression, TopActivations
from convlens.callbacks.feature_viz import FeatureVisualization
from convlens.callbacks.options import RENAMED_OPTIONS
from convlens.config import callback_config, check_override_keys
from convlens.errors import ConfigError
from convlens.methods import METHODS
from convlens.viz import common, deconvnet, layers
from convlens.viz.top_activations import RunningTopK

#: (class, earlier name, value, new name): every renamed option of every callback that has it
CASES = [
    (TopActivations, "filters", {"conv3": [5, 1]}, "units"),
    (TopActivations, "max_filters", 3, "max_units"),
    (DecodedFilters, "filters", {"conv3": [4]}, "units"),
    (DecodedFilters, "max_filters", 5, "max_units"),
    (FilterEvolution, "filters", {"conv3": 7}, "units"),
    (KernelSuppression, "filters", {"conv2": [0, 2]}, "units"),
    (DeconvProjection, "max_maps", 6, "max_units"),
    (DeconvProjection, "max_maps_by", "first", "max_units_by"),
    (FeatureVisualization, "filters", {"conv1": [2]}, "units"),
]


def deprecations(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("cls, old, value, new", CASES)
def test_an_earlier_option_name_works_and_warns_once_naming_the_new_one(cls, old, value, new):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        by_old = cls(**{old: value})
    assert deprecations(record) == [f"{cls.__name__}: the option `{old}` is now called `{new}`; `{old}` still "
                                    f"works until the next release"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        by_new = cls(**{new: value})
    assert deprecations(record) == []
    attr = {"max_units_by": "max_units_by", "max_units": "max_units", "units": "units"}[new]
    assert getattr(by_old, attr) == getattr(by_new, attr)
    assert getattr(by_old, attr) != getattr(cls(), attr)  # the value reached the option, not a default


@pytest.mark.parametrize("cls, old, value, new", CASES)
def test_both_names_at_once_are_a_one_line_config_error(cls, old, value, new):
    with pytest.raises(ConfigError, match=f"give `{new}` only; `{old}` is its earlier name") as error:
        cls(**{old: value, new: value})
    assert "\n" not in str(error.value)


def test_both_names_positional_and_keyword_are_an_error_too():
    with pytest.raises(ConfigError, match="give `max_units` only"):
        TopActivations(None, 4, 3, max_filters=3)  # layers, k, max_units


def test_an_earlier_key_in_a_hydra_config_works_and_warns():
    node = OmegaConf.create({"_target_": "convlens.callbacks.deconv.DeconvProjection", "max_maps": 5,
                             "max_maps_by": "index", "num_probe": 2})
    with pytest.warns(DeprecationWarning, match="`max_maps` is now called `max_units`"):
        callback = instantiate(node)
    assert (callback.max_units, callback.max_units_by) == (5, "first")


def test_the_project_config_uses_the_new_names_and_an_override_of_an_earlier_one_names_the_new_key():
    for method in METHODS:
        assert not set(RENAMED_OPTIONS) & set(callback_config(method)), method
    with pytest.raises(ConfigError, match=r"`max_maps` is now called `max_units`: set `callbacks.deconv.max_units="):
        check_override_keys(["callbacks=all", "callbacks.deconv.max_maps=8"])
    with pytest.raises(ConfigError, match=r"`filters` is now called `units`: set `callbacks.top_activations.units"):
        check_override_keys(["callbacks=all", "callbacks.top_activations.filters={conv1: [1]}"])


def test_renamed_methods_are_deprecated_aliases():
    net = torch.nn.Sequential()
    evolution = FilterEvolution(units={"conv3": 7})
    with pytest.warns(DeprecationWarning, match="tracked_map is now called tracked_unit"):
        assert evolution.tracked_map("conv3") == evolution.tracked_unit("conv3") == 7
    decoded = DecodedFilters(units={"conv3": [4, 2]})
    decoded.chosen_units["conv3"] = [4, 2]
    with pytest.warns(DeprecationWarning, match="filters_for is now called units_for"):
        assert decoded.filters_for(net, "conv3", None) == decoded.units_for(net, "conv3", None) == [4, 2]
    assert layers.rank_filters is layers.rank_units
    assert deconvnet.top_maps is deconvnet.top_units and deconvnet.Recording.top_maps is deconvnet.Recording.top_units
    assert common.check_channels is common.check_units


# -- checkpoints written by convlens <= 0.2 (the earlier state keys) ----------------------------------

def test_top_activations_loads_the_earlier_filters_key():
    old = TopActivations(units={"conv3": [5, 1]}).state_dict()
    old["filters"] = old.pop("units")
    resumed = TopActivations()
    resumed.load_state_dict(old)
    assert resumed.units == {"conv3": [5, 1]}


def test_decoded_loads_the_earlier_chosen_filters_key():
    saved = DecodedFilters()
    saved.chosen_units = {"conv2": [3, 0, 9], "conv4": None}
    old = saved.state_dict()
    old["chosen_filters"] = old.pop("chosen_units")
    resumed = DecodedFilters()
    resumed.load_state_dict(old)
    assert resumed.chosen_units == {"conv2": [3, 0, 9], "conv4": None}


def test_evolution_loads_the_earlier_filters_key():
    saved = FilterEvolution()
    saved.chosen = {"conv1": 4, "conv2": 11}
    old = saved.state_dict()
    old["filters"] = old.pop("tracked_units")
    resumed = FilterEvolution()
    resumed.load_state_dict(old)
    assert resumed.chosen == {"conv1": 4, "conv2": 11}


def test_running_top_k_loads_the_earlier_num_channels_key():
    top = RunningTopK(2, 3)
    top.update(torch.tensor([[1.0, 5.0, 2.0], [3.0, 4.0, 0.5]]), torch.tensor([10, 11]))
    old = top.state_dict()
    old["num_channels"] = old.pop("num_units")
    back = RunningTopK.from_state_dict(old)
    assert back.num_units == 3 and torch.equal(back.values, top.values) and torch.equal(back.image_ids, top.image_ids)


def test_a_real_checkpoint_with_the_earlier_state_keys_resumes(tmp_path):
    """A Lightning checkpoint whose callback states carry the earlier keys (as convlens <= 0.2 wrote
    them) resumes: the units chosen before come back."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import NetModule

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.rand(16, 3, 16, 16, generator=g), torch.arange(16) % 4), batch_size=8)

    def fit(callbacks, epochs, ckpt_path=None):
        trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, max_epochs=epochs, limit_train_batches=1,
                             limit_val_batches=1, accelerator="cpu", devices=1, logger=False, num_sanity_val_steps=0,
                             enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(NetModule(net()), data, data, ckpt_path=ckpt_path)

    def callbacks():
        return [TopActivations(layers=["3"], max_units=2, k=1, budget=None),
                DecodedFilters(layers=["3"], max_units=3, budget=None, compute_error=False),
                FilterEvolution(layers=["3"], summary=False, budget=None)]

    first = callbacks()
    fit([*first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], epochs=1)
    top, decoded, evolution = first
    top.units = {"3": [6, 1]}  # as if configured: the state carries it
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    renames = {top.state_key: ("units", "filters"), decoded.state_key: ("chosen_units", "chosen_filters"),
               evolution.state_key: ("tracked_units", "filters")}
    for key, (new, old) in renames.items():
        state = ckpt["callbacks"][key]
        state[old] = state.pop(new)
    # choices the resumed callbacks would not make themselves: they can only come from the checkpoint
    natural = (decoded.chosen_units["3"], evolution.chosen["3"])
    chosen = ({"3": [7, 0, 5] if natural[0] != [7, 0, 5] else [5, 0, 7]}, {"3": (natural[1] + 1) % 8})
    ckpt["callbacks"][top.state_key]["filters"] = {"3": [6, 1]}
    ckpt["callbacks"][decoded.state_key]["chosen_filters"] = chosen[0]
    ckpt["callbacks"][evolution.state_key]["filters"] = chosen[1]
    torch.save(ckpt, tmp_path / "old.ckpt")

    resumed = callbacks()
    fit(resumed, epochs=2, ckpt_path=tmp_path / "old.ckpt")
    assert resumed[0].units == {"3": [6, 1]}
    assert (resumed[1].chosen_units, resumed[2].chosen) == chosen
