"""Probe images: the fixed images a callback draws every epoch, chosen once at fit start.

From the first of: the `probe=` option (images, (images, labels), or a Dataset); the datamodule's
`probe_batch` (then a seeded subset of `num_probe`); the trainer's validation dataloader (one image
per class: the first `probe_per_class` of each class in dataset order, read directly when the
dataset lists its labels as `targets`/`labels` (ImageFolder, CIFAR10), else in loader order from
its first batches; at most `num_probe` (default 10) classes; collated and passed through the
module's batch transfer hooks, so in model input space). Batches are `(images, labels, ...)`
tuples/lists, dicts (`batch_keys`), or bare image tensors; anything else is a ConfigError naming
what was found.

The callbacks of one trainer that draw from the same source share one pool of images (each takes
its rows of it), so a checkpoint, which writes a storage shared by several tensors once, stores
them once.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import default_collate

from convlens.callbacks.lightning_compat import transfer_batch, val_loader
from convlens.callbacks.options import ProbeSpec
from convlens.errors import ConfigError

#: probe images drawn from a dataloader or Dataset when `num_probe` is None
DEFAULT_NUM_PROBE = 10
#: at most this many images are scanned for one image per class
PROBE_SCAN_LIMIT = 2048
#: dict batches: the keys tried for the images and the labels when `batch_keys` is None
IMAGE_KEYS = ("image", "images", "img", "pixel_values", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class")
#: per trainer, the probe pools of its callbacks by source
_SHARED_POOLS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

Pool = tuple[torch.Tensor, "torch.Tensor | None"]


def split_batch(batch: Any, keys: Sequence[str] | None = None, what: str = "a batch") -> tuple[torch.Tensor, Any]:
    """(images, labels or None) of a batch: `(images, labels, ...)` tuple/list, a dict (images and
    labels under `keys`, or under the usual names), or a bare image tensor. ConfigError otherwise,
    naming what was found and what to pass."""
    images, labels = None, None
    if torch.is_tensor(batch):
        images = batch
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, Mapping):
        image_keys = (keys[0],) if keys else IMAGE_KEYS
        label_keys = (keys[1],) if keys and len(keys) > 1 else (() if keys else LABEL_KEYS)
        found = [k for k in image_keys if k in batch]
        if not found:
            raise ConfigError(f"{what} is a dict with keys {sorted(map(str, batch))}, none of which holds the "
                              f"images (tried {', '.join(image_keys)}); pass batch_keys=(image_key, label_key)")
        images = batch[found[0]]
        labels = next((batch[k] for k in label_keys if k in batch), None)
    else:
        raise ConfigError(f"{what} is a {type(batch).__name__}; the callbacks read (images, labels) tuples or "
                          "lists, dicts (with batch_keys=(image_key, label_key)) or image tensors [N, C, H, W]")
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        shape = f"{images.dtype} {list(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"the images of {what} must be a float tensor [N, C, H, W] in model input space, got "
                          f"{shape}; pass probe=<images> or make the loader yield float image batches")
    if labels is not None:
        if isinstance(labels, (list, tuple)) and labels and all(isinstance(v, int) for v in labels):
            labels = torch.tensor(labels)
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point() \
                or len(labels) != len(images):
            labels = None  # not one class index per image (e.g. masks, boxes): no labels
    return images, labels


def _pick_per_class(images: torch.Tensor, labels: torch.Tensor | None, per_class: int,
                    limit: int, order: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `per_class` images of each class (classes in order of first appearance, at most
    `limit` of them), sorted by class; without labels, the first `limit` images."""
    if labels is None:
        return images[:limit], None
    chosen: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        if y not in chosen:
            if len(chosen) == limit:
                continue
            chosen[y] = []
        if len(chosen[y]) < per_class:
            chosen[y].append(i)
    index = torch.tensor([i for y in sorted(chosen) for i in chosen[y]], dtype=torch.long)
    if order is not None:
        order.extend(chosen)  # the classes in order of first appearance
    return images[index], labels[index]


def choose_probe(spec: ProbeSpec, trainer, pl_module, owner: str) -> tuple[Pool, torch.Tensor | None] | None:
    """(the shared pool of probe images and labels, this callback's rows of it or None for all),
    from the first source of the module docstring; None when there is no source."""
    limit = spec.num_probe or DEFAULT_NUM_PROBE
    dm = getattr(trainer, "datamodule", None)
    try:
        pools = _SHARED_POOLS.setdefault(trainer, {})
    except TypeError:  # a stand-in trainer that cannot be a weak key: nothing shared
        pools = {}
    index = None
    order: list[int] = []
    if isinstance(spec.explicit, tuple):
        images, labels = spec.explicit
        key = ("probe", tuple(images.shape), _digest(images), None if labels is None else _digest(labels))
        pool = pools.get(key, spec.explicit)
        if spec.num_probe is not None and spec.num_probe < len(images):
            index = torch.arange(spec.num_probe)
    elif spec.explicit is not None:
        key = ("dataset", id(spec.explicit), spec.probe_per_class, limit, spec.batch_keys)
        pool = pools.get(key) or _from_items(spec, spec.explicit, limit, owner)
    elif dm is not None and hasattr(dm, "probe_batch"):
        key = ("datamodule", id(dm), spec.probe_per_class)
        pool = pools.get(key) or dm.probe_batch(per_class=spec.probe_per_class)
        if spec.num_probe is not None and spec.num_probe < len(pool[1]):
            g = torch.Generator().manual_seed(spec.probe_seed)
            index = torch.randperm(len(pool[1]), generator=g)[: spec.num_probe].sort().values
    else:
        loader = val_loader(trainer)
        if loader is None:
            return None
        # one pool of the first max(limit, DEFAULT_NUM_PROBE) classes for every callback of this
        # loader; a callback with fewer probes takes the rows of the first `num_probe` classes
        scan = max(limit, DEFAULT_NUM_PROBE)
        key = ("val", id(getattr(loader, "dataset", loader)), spec.probe_per_class, scan, spec.batch_keys)
        pool = pools.get(key) or _from_loader(spec, loader, pl_module, scan, order, owner)
        order = pools.setdefault(key + ("class order",), order)
        labels = pool[1]
        if spec.num_probe is not None and labels is not None and spec.num_probe < len(order):
            first = set(order[: spec.num_probe])
            index = torch.tensor([i for i, y in enumerate(labels.tolist()) if y in first], dtype=torch.long)
        elif spec.num_probe is not None and labels is None and spec.num_probe < len(pool[0]):
            index = torch.arange(spec.num_probe)
    if key not in pools:
        images, labels = pool
        with torch.inference_mode(False):  # offline runs choose inside inference mode: keep normal tensors
            pools[key] = (images.detach().cpu().clone(),
                          labels.detach().cpu().long().clone() if labels is not None else None)
    return pools[key], index


def _from_loader(spec: ProbeSpec, loader, pl_module, limit: int, order: list, owner: str) -> Pool:
    picked = _by_targets(spec, loader, pl_module, limit, order)
    if picked is not None:
        return picked
    seen_images, seen_labels, count = [], [], 0
    classes: set[int] = set()
    for batch_idx, batch in enumerate(loader):
        batch = transfer_batch(pl_module, batch)  # what validation_step would receive
        images, labels = split_batch(batch, spec.batch_keys, f"validation batch #{batch_idx}")
        seen_images.append(images.detach().cpu())
        if labels is not None:
            seen_labels.append(labels.detach().cpu())
            classes.update(labels.tolist())
        count += len(images)
        full = (labels is None and count >= limit) or (
            len(classes) >= limit and _per_class_done(seen_labels, limit, spec.probe_per_class))
        if full or count >= PROBE_SCAN_LIMIT:
            break
    if not seen_images:
        raise ConfigError(f"{owner}: the validation dataloader is empty; pass probe=<images>")
    images = torch.cat(seen_images)
    labels = torch.cat(seen_labels) if len(seen_labels) == len(seen_images) else None
    return _pick_per_class(images, labels, spec.probe_per_class, limit, order)


def _by_targets(spec: ProbeSpec, loader, pl_module, limit: int, order: list) -> Pool | None:
    """When the loader's dataset lists its labels (`targets`/`labels`, as torchvision's
    ImageFolder and CIFAR10 do, also through a Subset): the first images of each class in
    dataset order, read directly (an image folder is sorted by class: a scan of its first
    batches would see one class). None when it does not, or its items do not collate."""
    dataset = getattr(loader, "dataset", None)
    targets = _dataset_targets(dataset)
    if targets is None:
        return None
    chosen: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        if y not in chosen:
            if len(chosen) == limit:
                continue
            chosen[y] = []
        if len(chosen[y]) < spec.probe_per_class:
            chosen[y].append(i)
    index = [i for y in sorted(chosen) for i in chosen[y]]
    try:
        collate = getattr(loader, "collate_fn", None) or default_collate
        batch = collate([dataset[i] for i in index])
    except Exception:  # noqa: BLE001  items this collate cannot batch: scan the loader instead
        return None
    images, labels = split_batch(transfer_batch(pl_module, batch), spec.batch_keys, "the validation dataset's items")
    order.extend(chosen)  # the classes in order of first appearance
    return images.detach().cpu(), labels.detach().cpu() if labels is not None else None


def _per_class_done(seen_labels, limit: int, per_class: int) -> bool:
    counts = torch.bincount(torch.cat(seen_labels).clamp_min(0))
    return int((counts >= per_class).sum()) >= limit


def _from_items(spec: ProbeSpec, dataset, limit: int, owner: str) -> Pool:
    what = "the probe Dataset"
    images, labels = [], []
    for i in range(min(len(dataset), PROBE_SCAN_LIMIT)):
        x, y = split_batch(_as_batch(dataset[i]), spec.batch_keys, f"{what}[{i}]")
        images.append(x)
        labels.append(y)
        if y is None and len(images) >= limit:
            break
    if not images:
        raise ConfigError(f"{owner}: {what} is empty")
    x = torch.cat(images)
    y = torch.cat(labels) if all(v is not None for v in labels) else None
    return _pick_per_class(x, y, spec.probe_per_class, limit)


def _digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's values (telling apart explicit probes that are the same images)."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _dataset_targets(dataset) -> list[int] | None:
    """The label of every item of a map-style dataset, when it lists them (`targets` or `labels`, a
    sequence of ints as long as the dataset; through Subset-like `.indices`/`.dataset`)."""
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    indices = getattr(dataset, "indices", None)
    base = getattr(dataset, "dataset", None)
    if indices is not None and base is not None:
        inner = _dataset_targets(base)
        return [inner[int(i)] for i in indices] if inner is not None else None
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is None or isinstance(values, (str, bytes)):
            continue
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if values.dim() == 1 and len(values) == len(dataset) and not values.is_floating_point() \
                and values.dtype != torch.bool:
            return values.tolist()
    return None


def _as_batch(item):
    """A Dataset item (image [C, H, W], label) as a batch of one."""
    if torch.is_tensor(item):
        return item.unsqueeze(0)
    if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
        label = item[1] if len(item) > 1 else None
        label = torch.as_tensor(label).reshape(1) if isinstance(label, (int, torch.Tensor)) and \
            torch.as_tensor(label).numel() == 1 else None
        return (item[0].unsqueeze(0), label) if label is not None else item[0].unsqueeze(0)
    if isinstance(item, Mapping):
        return {k: (v.unsqueeze(0) if torch.is_tensor(v) and v.dim() == 3 else
                    torch.as_tensor(v).reshape(1) if isinstance(v, int) or (torch.is_tensor(v) and v.numel() == 1)
                    else v) for k, v in item.items()}
    return item
