"""Shared test fixtures: compose the real Hydra config, run `train(cfg)` in a tmp dir, read events."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets"

# a tiny, fast shapes run: what most end-to-end tests start from
FAST_SHAPES = [
    "experiment=shapes_demo",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "datamodule.n_train=640",
    "datamodule.val_size=128",
    "datamodule.n_test=128",
    "~callbacks.rich_progress_bar",
    "++trainer.enable_model_summary=false",
    "++trainer.enable_progress_bar=false",
]


def compose_cfg(overrides: Sequence[str], output_dir: str | os.PathLike, config_name: str = "train") -> DictConfig:
    """The config `python <config_name>.py <overrides>` would see, with its run dir at `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def read_events(logdir: str | os.PathLike) -> dict[str, dict[str, list[int]]]:
    """{"images": {tag: [steps]}, "scalars": {tag: [steps]}} of every event file under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, list[int]]] = {"images": {}, "scalars": {}}
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            out["images"].setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in acc.Tags()["scalars"]:
            out["scalars"].setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return out


@pytest.fixture
def shared_data():
    """DATA_DIR with the real datasets, or skip with the reason."""
    root = Path(os.environ.get("DATA_DIR", SHARED_DATA))
    if not (root / "MNIST" / "raw").is_dir() and not (root / "cifar10-jpg").is_dir():
        pytest.skip(f"real datasets not found under {root} (set DATA_DIR=../shared/datasets)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches go to a per-session tmp dir unless CONVLENS_CACHE is set by the caller."""
    if "CONVLENS_CACHE" not in os.environ:
        monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)
