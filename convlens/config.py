"""The packaged Hydra config (`convlens.conf`) and helpers to compose and instantiate it in code.

`compose_config(overrides)` gives the config `convlens-train <overrides>` would see, without
running anything: for notebooks, tests and benchmarks.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

#: the Python package that holds the YAML config groups
CONFIG_MODULE = "convlens.conf"
#: what `@hydra.main(config_path=...)` and `hydra.searchpath` take
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def native_bf16(accelerator: str = "auto") -> bool:
    """Whether `accelerator` ("cpu", "gpu"/"cuda", or "auto": a GPU if there is one) computes in
    bfloat16 natively: CUDA GPUs from Ampere on; CPUs with AMX tiles or AVX-512 BF16
    instructions (elsewhere bfloat16 is emulated, and slower than float32)."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if accelerator in ("cpu", "auto"):
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the guard
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def fast_precision(accelerator: str = "auto") -> str:
    """Lightning's `precision` for training on `accelerator`: "bf16-mixed" where bfloat16 is native
    (`native_bf16`), "16-mixed" on older CUDA GPUs, else "32-true". The config's default
    (`trainer.precision`); override it, e.g. `trainer.precision=32-true`, to train in float32."""
    if native_bf16(accelerator):
        return "bf16-mixed"
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "16-mixed"
    return "32-true"


def _folder_value(what: str, root) -> int:
    from convlens.datamodules.imagefolder import folder_value

    return folder_value(what, root)


# `${convlens_precision:${trainer.accelerator}}` in conf/trainer/default.yaml
OmegaConf.register_new_resolver("convlens_precision", fast_precision, replace=True)
# `${convlens_folder:num_classes,${.root}}` in conf/datamodule/imagefolder.yaml: read off the folder
OmegaConf.register_new_resolver("convlens_folder", _folder_value, replace=True)


def compose_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None,
                   config_name: str = "train") -> DictConfig:
    """The config `convlens-<config_name> <overrides>` would see. With `output_dir`, the run dir
    (and the log and root dirs) point there, so nothing is written elsewhere. Also sets Hydra's
    runtime config, which `${hydra:...}` interpolations and `HydraConfig.get()` read."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(output_dir)
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg


def instantiate_dict(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group dict (callbacks, loggers); entries set
    to null are skipped (`callbacks.rich_progress_bar=null` turns one off)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def callback_config(name: str) -> DictConfig:
    """The packaged config of one callback, `conf/callbacks/<name>.yaml`'s `<name>` node."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    return OmegaConf.create(files(CONFIG_MODULE).joinpath("callbacks", f"{name}.yaml").read_text())[name]
