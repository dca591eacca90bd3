"""Option checks shared by every callback, and `ProbeSpec`: the probe options every callback takes.

One family of checks, one error type (`ConfigError`, a one-line message naming the option, what
it got and what it takes), run in the constructor, so a bad option fails when the callback is
built (by Hydra or by hand), before any training.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_deprecation
from torch.utils.data import Dataset

from convlens.errors import ConfigError

#: target values every callback that explains a class accepts
TARGETS = ("true", "predicted")
#: how a callback picks the units (output channels) of a layer it draws when `units` does not
#: name them: the most active on the probe images, or the first ones (0, 1, ...)
UNIT_SELECTIONS = ("most_active", "first")
#: the options of `ProbeSpec`, as a callback's constructor (and its Hydra config) takes them
PROBE_OPTIONS = ("probe", "num_probe", "probe_per_class", "probe_seed", "mean", "std", "batch_keys")
#: callback options renamed to the glossary's words (docs/glossary.md): earlier name -> name. A
#: callback that takes the new name still takes the earlier one, with a deprecation warning, until
#: the next release (`accept_renamed`)
RENAMED_OPTIONS = {"filters": "units", "max_filters": "max_units", "max_maps": "max_units",
                   "max_maps_by": "max_units_by"}


def accept_renamed(init):
    """`init` (a callback's `__init__`) taking also the earlier names (`RENAMED_OPTIONS`) of the
    options it has: an earlier name is passed on under the new one with one deprecation warning
    naming the new key; both names at once are a ConfigError. `init` itself when it has none."""
    params = inspect.signature(init).parameters
    renamed = {old: new for old, new in RENAMED_OPTIONS.items() if new in params and old not in params}
    if not renamed:
        return init

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        for old in [k for k in kwargs if k in renamed]:
            new, owner = renamed[old], type(self).__name__
            if new in kwargs or new in inspect.signature(init).bind_partial(self, *args).arguments:
                raise ConfigError(f"{owner}: give `{new}` only; `{old}` is its earlier name (got both)")
            rank_zero_deprecation(f"{owner}: the option `{old}` is now called `{new}`; `{old}` still works "
                                  f"until the next release")
            kwargs[new] = kwargs.pop(old)
        return init(self, *args, **kwargs)

    wrapper._convlens_renamed = renamed
    return wrapper


def check_int(name: str, value: Any, minimum: int, what: str = "") -> int:
    """A callback option that must be an int >= `minimum`: a ConfigError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}{what}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str], what: str = "") -> str:
    if value not in choices:
        raise ConfigError(f"Unknown {name}={value!r}; use one of {', '.join(choices)}{what}")
    return value


def check_layers(layers: Any) -> list[str] | None:
    """`layers`: a list of layer names (a single name stands for a list of one), or None."""
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and (isinstance(layers, Mapping) or not all(isinstance(x, str) and x for x in layers)):
        raise ConfigError(f"layers must be a list of layer names (or null for the defaults), got {layers!r}")
    return list(layers) if layers is not None else None


def check_units(units: Any, one_per_layer: bool = False) -> dict[str, list[int]]:
    """The `units` option, the same type in every callback: a mapping layer name -> list of unit
    (output channel) indices (an int stands for a one-element list), e.g. {conv3: [0, 7, 42]};
    None is {}. `one_per_layer`: exactly one index per layer (a tracked unit)."""
    if units is None:
        return {}
    example = "{conv3: 17}" if one_per_layer else "{conv3: [0, 7, 42]}"
    if not isinstance(units, Mapping):
        raise ConfigError(f"units must map layer names to lists of unit indices, e.g. {example}, "
                          f"got {type(units).__name__}")
    out: dict[str, list[int]] = {}
    for layer, indices in units.items():
        if not isinstance(layer, str):
            raise ConfigError(f"units keys must be layer names (str), got {layer!r}")
        if isinstance(indices, int) and not isinstance(indices, bool):
            indices = [indices]
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not len(indices):
            raise ConfigError(f"units[{layer!r}] must be a non-empty list of unit indices, got {indices!r}")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ConfigError(f"units[{layer!r}] must hold unit indices (ints >= 0), got {bad}")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"units[{layer!r}] lists a unit twice: {list(indices)}")
        if one_per_layer and len(indices) != 1:
            raise ConfigError(f"units[{layer!r}] must name one unit to track, e.g. {example}, got {list(indices)}")
        out[layer] = [int(i) for i in indices]
    return out


def check_unit_range(owner: str, units: Mapping[str, Sequence[int]], layer: str, count: int) -> None:
    """The `units` of `layer` (a layer with `count` units) in range: a ConfigError naming them otherwise."""
    bad = [u for u in units.get(layer, ()) if u >= count]
    if bad:
        raise ConfigError(f"{owner}: units[{layer!r}] has unit {max(bad)}, but {layer} has {count} units "
                          f"(valid: 0..{count - 1}); fix `units` or `layers`")


#: the earlier name of `check_units`
check_filters = check_units


def _check_images(probe: Any):
    """An explicit probe as (images, labels or None), copied to the CPU; a Dataset as it is."""
    if probe is None or isinstance(probe, Dataset):
        return probe
    if torch.is_tensor(probe):
        probe = (probe, None)
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and torch.is_tensor(probe[0]):
        images, labels = probe
        if images.dim() != 4 or not images.is_floating_point() or not len(images):
            raise ConfigError(f"probe images must be a non-empty float tensor [N, C, H, W] in model input "
                              f"space, got {images.dtype} {list(images.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (len(images),) or labels.is_floating_point():
                raise ConfigError(f"probe labels must be one class index per image, shape [{len(images)}], "
                                  f"got {labels.dtype} {list(labels.shape)}")
        return images.detach().cpu().clone(), labels.long().cpu().clone() if labels is not None else None
    raise ConfigError(f"probe must be an image tensor [N, C, H, W], a pair (images, labels) or a Dataset, got "
                      f"{type(probe).__name__}")


def _check_mean_std(mean, std):
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std (the per-channel normalization of the model input), or neither")
    if mean is None:
        return None
    try:
        m, sd = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"mean and std must be numbers or per-channel lists, e.g. mean=[0.485, 0.456, "
                          f"0.406], std=[0.229, 0.224, 0.225]: {e}") from None
    if m.dim() > 1 or sd.dim() > 1 or (sd <= 0).any():
        raise ConfigError(f"mean and std must be per-channel lists (std > 0), got {mean!r}, {std!r}")
    return m, sd


@dataclass(frozen=True, eq=False)
class ProbeSpec:
    """Where a callback's probe images come from and how they are shown; every callback takes these
    options (flat, as `num_probe=4`, or as `ProbeSpec(...)`), checked here once.

    Args:
        probe: explicit probe images: a float tensor [N, C, H, W] in model input space, a pair
            (images, labels), or a `Dataset` of (image, label) items (one image per class is taken,
            as from the validation loader). None: the datamodule's `probe_batch()`, else the
            validation dataloader.
        num_probe: how many probe images (None: one per class, at most 10 classes).
        probe_per_class: images per class.
        probe_seed: the seed of the subset when `num_probe` is fewer than the images at hand.
        mean, std: the per-channel normalization of the model's input, undone for display.
        batch_keys: (image_key, label_key) of dict batches.
    """

    probe: Any = None
    num_probe: int | None = None
    probe_per_class: int = 1
    probe_seed: int = 0
    mean: Any = None
    std: Any = None
    batch_keys: tuple[str, ...] | None = None
    #: the checked probe: (images, labels) on the CPU, a Dataset, or None
    explicit: Any = field(default=None, init=False, repr=False, compare=False)
    #: the checked (mean, std) tensors, or None
    mean_std: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_probe is not None:
            check_int("num_probe", self.num_probe, 1, " (or null: all probe images)")
        check_int("probe_per_class", self.probe_per_class, 1)
        check_int("probe_seed", self.probe_seed, 0)
        keys = self.batch_keys
        if keys is not None and (isinstance(keys, str) or len(keys) not in (1, 2)
                                 or not all(isinstance(k, str) for k in keys)):
            raise ConfigError(f"batch_keys must be (image_key, label_key), e.g. ('image', 'label'), got {keys!r}")
        object.__setattr__(self, "batch_keys", tuple(keys) if keys is not None else None)
        object.__setattr__(self, "explicit", _check_images(self.probe))
        object.__setattr__(self, "mean_std", _check_mean_std(self.mean, self.std))

    @classmethod
    def from_options(cls, owner: str, probe: Any = None, own_options: Sequence[str] = (), **options) -> "ProbeSpec":
        """A ProbeSpec from a callback's keyword options; `probe` may already be one. An unknown
        option is a ConfigError naming the closest valid ones (`own_options`: the callback's)."""
        if isinstance(probe, ProbeSpec):
            if options:
                raise ConfigError(f"{owner}: give the probe options inside probe=ProbeSpec(...) or as keywords, "
                                  f"not both (got {', '.join(options)} too)")
            return probe
        unknown = sorted(set(options) - set(PROBE_OPTIONS))
        if unknown:
            valid = list(own_options) + list(PROBE_OPTIONS)
            close = [m for u in unknown for m in difflib.get_close_matches(u, valid, n=1)]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"{owner} has no option {', '.join(unknown)}; {hint}its options are {', '.join(valid)}")
        return cls(probe=probe, **options)
