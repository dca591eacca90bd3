"""The packaged Hydra config (`convlens.conf`) and helpers to compose and instantiate it in code.

`compose_config(overrides)` gives the config `convlens-train <overrides>` would see, without
running anything: for notebooks, tests and benchmarks. `check_override_keys` answers a mistyped key
on the command line with the closest keys the config has, before Hydra starts (and suggests an
`+key=...` that would fail again); `instantiate_checked` does the same for an argument the config
gives a class that does not take it.
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
import inspect
import os
import re
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from convlens.errors import ConfigError, in_chain

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


#: the longest job folder name (most filesystems allow 255 bytes)
MAX_DIRNAME = 200


def short_dirname(name: str, limit: int = MAX_DIRNAME) -> str:
    """A sweep job's folder name (Hydra's `override_dirname`, `a.b=1,c=2`) that fits `limit` bytes:
    the name itself; else each override by the last part of its key (`b=1,c=2`); else the start of
    that. A shortened name ends in a hash of the whole, so two jobs never share a folder by it."""
    if len(name.encode()) <= limit:
        return name
    digest = "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    short = ",".join(f"{k.lstrip('+~').rsplit('.', 1)[-1]}={v}" if v else k
                     for k, _, v in (part.partition("=") for part in name.split(",")))
    return short.encode()[:limit - len(digest)].decode(errors="ignore") + digest


# `${convlens_dirname:${hydra.job.override_dirname}}` in conf/hydra/default.yaml
OmegaConf.register_new_resolver("convlens_dirname", short_dirname, replace=True)
# `${convlens_precision:${trainer.accelerator}}` in conf/trainer/default.yaml
OmegaConf.register_new_resolver("convlens_precision", fast_precision, replace=True)
# `${convlens_folder:num_classes,${.root}}` in conf/datamodule/imagefolder.yaml: read off the folder
OmegaConf.register_new_resolver("convlens_folder", _folder_value, replace=True)


def beside_checkpoint(ckpt_path: str | None, fallback: str) -> str:
    """Where `convlens-visualize` writes: `<run dir>/visualize` for a checkpoint in a run's
    `checkpoints/` folder, else a `visualize` folder beside the checkpoint; without one, `fallback`."""
    if not ckpt_path:
        return fallback
    folder = Path(str(ckpt_path)).expanduser().absolute().parent
    return str((folder.parent if folder.name == "checkpoints" else folder) / "visualize")


# `${convlens_beside:${oc.select:ckpt_path,""},...}` in conf/visualize.yaml
OmegaConf.register_new_resolver("convlens_beside", beside_checkpoint, replace=True)


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


# ----------------------------------------------------------------------------------------------
# a mistyped key: the closest ones the config has
# ----------------------------------------------------------------------------------------------

def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a plain nested dict, dotted (list items are not keys)."""
    if not isinstance(node, dict):
        return []
    out = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += [key, *_dotted_keys(v, key)]
    return out


def _deepest_parent(key: str, tree: dict) -> tuple[list[str], Any]:
    """(path, node) of the deepest part of the dotted `key`'s parents that `tree` has."""
    node, path = tree, []
    for part in key.split(".")[:-1]:
        if not isinstance(node, dict) or part not in node:
            break
        node, path = node[part], [*path, part]
    return path, node


def closest_keys(key: str, tree: dict, n: int = 3) -> list[str]:
    """The keys of `tree` (a plain nested dict) nearest to the dotted `key` that it lacks: first
    those beside where `key` would be (a mistyped last name), then the closest full keys (not
    `key`'s own parents)."""
    path, node = _deepest_parent(key, tree)
    near = []
    if isinstance(node, dict) and len(path) == key.count("."):
        siblings = [k for k in node if isinstance(k, str)]
        near = [".".join([*path, m]) for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], siblings, n, 0.6)]
    near += [k for k in difflib.get_close_matches(key, _dotted_keys(tree), n + key.count("."), 0.75)
             if not key.startswith(f"{k}.")]
    return list(dict.fromkeys(near))[:n]


def _keys_near(key: str, tree: dict, n: int = 3) -> str:
    """`did you mean ...?`, or else what the deepest existing parent of `key` holds; for an argument
    the parent's `_target_` takes but the config does not set, how to add it (`+key=...`)."""
    path, node = _deepest_parent(key, tree)
    rest = key.split(".")[len(path):]
    from convlens.callbacks.options import RENAMED_OPTIONS  # here: importing the callbacks costs seconds

    renamed = RENAMED_OPTIONS.get(rest[0]) if len(rest) == 1 else None
    if renamed is not None and isinstance(node, dict) and renamed in node:
        return f"`{rest[0]}` is now called `{renamed}`: set `{'.'.join([*path, renamed])}=...`"
    if len(rest) == 1 and isinstance(node, dict) and isinstance(node.get("_target_"), str):
        try:
            from hydra.utils import get_object

            takes = inspect.signature(get_object(node["_target_"])).parameters
        except Exception:  # noqa: BLE001  a target that cannot be inspected: no such advice
            takes = {}
        if rest[0] in takes:
            return f"`{rest[0]}` is an argument of {node['_target_']}: add it with `+{key}=...`"
    near = closest_keys(key, tree, n)
    if near:
        return f"did you mean {' or '.join(f'`{k}`' for k in near)}?"
    path, node = _deepest_parent(key, tree)
    names = [str(k) for k in node] if isinstance(node, dict) else []
    where = f"`{'.'.join(path)}` has" if path else "the config's top-level keys are"
    return f"{where}: {', '.join(names[:15])}{' ...' if len(names) > 15 else ''}"


def _missing(tree: dict, key: str) -> bool:
    """Whether setting the dotted `key` fails for want of the key (not for a null, a value or a
    list on the way, which Hydra judges itself)."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return True
        node = node[part]
    return False


def check_override_keys(overrides: Sequence[str], config_name: str = "train") -> None:
    """Raise a ConfigError, one line, for the first override of `overrides` that sets a key the
    composed config does not have (`trainer.max_epoch=1`), naming the closest keys it has (`did you
    mean trainer.max_epochs?`); Hydra's own advice, `+trainer.max_epoch=1`, fails again later.
    Overrides it cannot judge (a sweep over a config group, a syntax error, a config that does not
    compose) are left to Hydra, which says what is wrong with them."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:
        return
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        groups = set(GlobalHydra.instance().config_loader().list_groups(""))
        structure, values = [], []  # what shapes the config (groups, added and deleted keys); what sets a key
        for o in parsed:
            key = o.key_or_group
            if o.package is not None or "/" in key or key in groups:
                if o.is_sweep_override():
                    return  # the keys differ from option to option
                structure.append(o.input_line)
            elif o.is_delete():
                structure.append(f"~{key}")
            elif o.is_add() or o.is_force_add():
                structure.append(f"{'++' if o.is_force_add() else '+'}{key}=null" if o.is_sweep_override()
                                 else o.input_line)
            elif key.split(".")[0] != "hydra":  # Hydra's own keys are Hydra's to check
                values.append(o)
        try:
            tree = OmegaConf.to_container(compose(config_name, overrides=structure), resolve=False)
        except Exception:
            return
    replaced: list[str] = []  # keys given a whole dict: what is under them is that dict's
    for o in values:
        key = o.key_or_group
        if any(key.startswith(f"{k}.") for k in replaced):
            continue
        if _missing(tree, key):
            raise ConfigError(f"{o.input_line}: the config has no key `{key}`; {_keys_near(key, tree)} "
                              f"(nothing was run)")
        if not o.is_sweep_override() and isinstance(o.value(), dict):
            replaced.append(key)


def instantiate_checked(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node, **kwargs)`; an argument that the config gives `node._target_` and that it
    does not take (`+trainer.max_epoch=1`) is a ConfigError naming the closest ones it takes."""
    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        hint = _unexpected_argument(e, node, key)
        if hint is None:
            raise
        raise hint from e


def _unexpected_argument(error: BaseException, node: DictConfig, key: str) -> ConfigError | None:
    from hydra.utils import get_object

    cause = in_chain(error, lambda e: isinstance(e, TypeError) and "unexpected keyword argument" in str(e))
    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(cause or ""))
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if found is None or target is None:
        return None
    try:
        cls = get_object(target)
        takes = [p.name for p in inspect.signature(cls).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except Exception:
        return None
    if getattr(cls, "__name__", None) != found.group(1):
        return None  # raised by a class nested in it
    arg = found.group(2)
    near = difflib.get_close_matches(arg, takes, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(f'`{key}.{n}`' for n in near)}?" if near
            else f"it takes: {', '.join(takes)}")
    return ConfigError(f"{key}.{arg}: {cls.__name__} takes no argument `{arg}`; {hint}")
