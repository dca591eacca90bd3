"""Mistakes: every n epochs, the misclassified validation images beside their nearest training
images, a confusion matrix, per-class accuracy and, optionally, TensorBoard's embedding projector.

Follows Vanrell & Arias's lecture "Understanding and visualizing CNNs" (Master in Computer Vision,
Barcelona): "Data inspection" (find the incorrectly classified test data, find the most similar
training images, check whether the error comes from wrongly labelled training data, a similar
class, or context over the object; after Koh & Liang, ICML 2017, arXiv:1703.04730) and "Explaining
by case" (with a prediction, the nearest neighbours of its activations in the training set). The
algorithms are `viz.knn` (features, exact batched kNN, confusion matrix, suspects); this callback
collects, renders and logs.

Features: the input of the classifier head (`viz.knn.classifier_head`: the last module with weights,
e.g. torchvision's `fc` or `classifier.6`), or the output of `layer`, averaged over space
(`pool="avg"`) or flattened. Any classifier works, with or without convolutions.

Collection, during Lightning's own validation pass of each due epoch (no second pass): forward
hooks on the head (and on `layer`) are added at validation epoch start and removed at its end; each
batch's class scores, features and labels are kept for the misclassified images (and the images
of the few most confident mistakes), only predictions and labels for the others. Under DDP every
rank collects its share; the shares are gathered at validation epoch end (images seen twice, as
DDP's padding repeats them, count once) and rank zero draws.

The reference bank, computed at the end of each due epoch with the model in eval mode (and the
validation step's precision): the features of a fixed, seeded subset of `bank_size` training images
(all of them when fewer), read from the first of:
- `reference=`: a Dataset of (image, label) items in model input space, taken as it is;
- a convlens datamodule (`train_set` with `images`/`labels` tensors and a `normalization`): its
  training images through its validation transform (the normalization, without augmentation);
- the training dataloader's dataset (`datamodule.train_dataloader()` in an offline run): when it and
  the validation dataset carry a torchvision-style `transform` (through `Subset`-like `.dataset`
  wrappers), a shallow copy of it with the validation dataset's transform; when only the training
  dataset has one, it is used as it is, with its (possibly random) training transforms, and one
  warning says so. Batches go through the module's batch transfer hooks, as validation batches do.
With none of these (an offline run without training data, an `IterableDataset`), the mistakes are
drawn without neighbours, and one warning says how to give a reference.

Logged at the step of the epoch's validation scalars (`callbacks.lightning_compat.log_step`):
- `mistakes/nearest`: one row per misclassified image, most confident wrong prediction first (the
  top `num_mistakes`): the image captioned with its true class and the prediction with its
  probability, then its k nearest training images captioned with their labels and distances; a
  neighbour whose label differs from the image's true label has a red frame and a `*`;
- `mistakes/suspects`: the training images most often a differing neighbour of a mistake (over all
  mistakes), with their labels and counts: candidates for wrong labels or overlapping classes;
- `mistakes/confusion`: the confusion matrix (rows true, columns predicted; colour = fraction of
  the row, number = count);
- scalars `mistakes/neighbour_disagreement` (fraction of all mistakes' neighbours whose label
  differs from the mistake's true label: a cheap label-noise / class-overlap signal),
  `mistakes/count`, `mistakes/class_acc/<class>` (up to `MAX_CLASS_SCALARS` classes), and
  `viz_time/mistakes_collect` (seconds this rank spent collecting during validation);
- `projector=true`, every `projector_every_n_epochs` epochs: the validation features to
  TensorBoard's embedding projector (tag `mistakes/projector`, through each TensorBoardLogger's
  `SummaryWriter.add_embedding`) with true and predicted classes as metadata and a sprite of
  thumbnails. The projector refuses sprites over 8192x8192 px: at most `sprite_capacity` thumbnails
  (and `projector_max_points`) are shown, a fixed subset chosen by each image's content hash, and a
  warning says how many of how many.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from convlens.callbacks.collect import ValidationCollector
from convlens.callbacks.lightning_compat import log_step, transfer_batch, val_dataset
from convlens.callbacks.options import check_choice, check_int
from convlens.callbacks.probe import split_batch
from convlens.errors import ConfigError, one_line
from convlens.render import (as_rgb, captioned_grid, class_caption, colorbar, fit_caption, heatmap, legend,
                             stack_vertical, tile_width, to_pixels, upscale)
from convlens.viz.knn import (METRICS, POOLS, SPRITE_LIMIT, FeatureSource, class_accuracy, confusion_matrix,
                              feature_source, knn, layer_features, pool_features, rank_mistakes, sprite_capacity,
                              suspects)
from convlens.viz.layers import get_layer
from convlens.viz.top_activations import content_ids

#: per-class accuracy scalars are logged for at most this many classes
MAX_CLASS_SCALARS = 100
#: above this many classes the confusion matrix is drawn as one heat map, without numbers
MAX_CONFUSION_CELLS = 30
#: the frame of a neighbour whose label differs from the image's true label
DIFFERS_COLOR = (0.9, 0.1, 0.1)


# -- the reference images ----------------------------------------------------------------------------
class Reference:
    """Where the bank's images come from: `read(rows)` gives (images in model input space on the
    module's device, labels) of those dataset rows; `description` says what it is."""

    def __init__(self, size: int, read, description: str):
        self.size, self.read, self.description = size, read, description


def _first_loader(loaders):
    if isinstance(loaders, dict):
        return _first_loader(next(iter(loaders.values()), None))
    if isinstance(loaders, (list, tuple)):
        return _first_loader(loaders[0]) if loaders else None
    return loaders


def _transform_owner(dataset: Any, depth: int = 8):
    """The dataset (or the one it wraps, through `.dataset`) that carries a `transform`, or None."""
    for _ in range(depth):
        if dataset is None:
            return None
        if hasattr(dataset, "transform"):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def with_transform(dataset: Any, transform: Any) -> Any:
    """A shallow copy of `dataset` whose transform (through `.dataset` wrappers) is `transform`; the
    original is left as it is."""
    if hasattr(dataset, "transform"):
        new = copy.copy(dataset)
        new.transform = transform
        try:
            from torchvision.datasets.vision import StandardTransform

            if isinstance(getattr(new, "transforms", None), StandardTransform):
                new.transforms = StandardTransform(transform, getattr(new, "target_transform", None))
        except ImportError:  # pragma: no cover
            pass
        return new
    new = copy.copy(dataset)
    new.dataset = with_transform(dataset.dataset, transform)
    return new


def _safe_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "class"


def _thumbnails(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """[N, 3, side, side] squares (area-averaged when shrinking)."""
    mode = "area" if max(pixels.shape[-2:]) > side else "nearest"
    return F.interpolate(as_rgb(pixels.float()), size=(side, side), mode=mode)


def _shrunk(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Tiles scaled to about `size` a side: shrunk (area) when larger, enlarged by an integer factor
    (nearest) when smaller, so that frames drawn on them keep the same width at any image size."""
    h, w = pixels.shape[-2:]
    if max(h, w) <= size:
        return upscale(pixels, size)
    f = size / max(h, w)
    return F.interpolate(pixels, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")


def _framed(tiles: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """A red frame (a sixteenth of the side, at least one pixel) around `tiles[which]`."""
    tiles = tiles.clone()
    side = max(1, round(min(tiles.shape[-2:]) / 16))
    color = torch.tensor(DIFFERS_COLOR).view(3, 1, 1)
    for i in which.nonzero().flatten().tolist():
        for region in ((slice(None), slice(0, side)), (slice(None), slice(-side, None)),
                       (slice(0, side), slice(None)), (slice(-side, None), slice(None))):
            tiles[i, :, region[0], region[1]] = color
    return tiles


class Mistakes(ValidationCollector):
    """Misclassified validation images beside their nearest training images (`mistakes/nearest`),
    the training images most often a differing neighbour (`mistakes/suspects`), the confusion
    matrix (`mistakes/confusion`), per-class accuracy, and optionally the embedding projector.

    Args:
        layer: features from this layer's output (any module of the net); None: the input of the
            classifier head (found on any torchvision-style net).
        k: nearest training images per mistake.
        num_mistakes: rows drawn (the most confident wrong predictions).
        bank_size: training images in the reference bank (a fixed subset seeded by `bank_seed`; all
            of them when there are fewer).
        bank_seed: the seed of that subset.
        metric: "cosine" or "euclidean" distance between features.
        pool: "avg" (maps averaged over space) or "flatten" (every value) for 4-D features.
        reference: a Dataset of (image, label) in model input space for the bank (None: the
            training data, see the module docstring).
        batch_size: images per forward pass when computing the bank.
        num_suspects: training images drawn in `mistakes/suspects` (0: not drawn).
        projector: also write the validation features to TensorBoard's embedding projector.
        projector_every_n_epochs: how often (in epochs that draw) the projector is written.
        projector_max_points: at most this many validation images in the projector.
        projector_image_size: thumbnail side in the projector's sprite (pixels).
        tile_size: tiles are scaled (nearest, integer factor up; area down) to about this many pixels.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec` (one probe image finds the head;
            `batch_keys` reads dict batches).
    """

    name = "mistakes"
    layer_kind = None
    needs_layers = False  # `layer` is checked here: the default reads the head's input, not a layer's output
    needs_conv = False    # any classifier: features of its head
    state_key_options = ("layers", "bank_size", "bank_seed", "metric", "pool")

    def __init__(self, layer: str | None = None, k: int = 5, num_mistakes: int = 8, bank_size: int = 5000,
                 bank_seed: int = 0, metric: str = "cosine", pool: str = "avg", reference: Dataset | None = None,
                 batch_size: int = 256, num_suspects: int = 8, projector: bool = False,
                 projector_every_n_epochs: int = 10, projector_max_points: int = 4096,
                 projector_image_size: int = 32, tile_size: int = 64, every_n_epochs: int = 1, **probe_options):
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"layer must be one layer name (a string) or null (the classifier head's input), "
                              f"got {layer!r}")
        super().__init__(layers=[layer] if layer is not None else None, every_n_epochs=every_n_epochs,
                         **probe_options)
        check_int("k (neighbours per mistake)", k, 1)
        check_int("num_mistakes (rows drawn)", num_mistakes, 1)
        check_int("bank_size (training images in the reference bank)", bank_size, 1)
        check_int("bank_seed", bank_seed, 0)
        check_int("batch_size", batch_size, 1)
        check_int("num_suspects", num_suspects, 0, " (0: not drawn)")
        check_int("projector_every_n_epochs", projector_every_n_epochs, 1)
        check_int("projector_max_points", projector_max_points, 1)
        check_int("projector_image_size", projector_image_size, 1, " (pixels)")
        if projector_image_size > SPRITE_LIMIT:
            raise ConfigError(f"projector_image_size must be at most {SPRITE_LIMIT} (the projector's sprite limit), "
                              f"got {projector_image_size}")
        check_int("tile_size", tile_size, 1, " (pixels)")
        check_choice("metric", metric, METRICS)
        check_choice("pool", pool, POOLS, " ('avg': maps averaged over space, 'flatten': every value)")
        if not isinstance(projector, bool):
            raise ConfigError(f"projector must be true or false, got {projector!r}")
        if reference is not None and not isinstance(reference, Dataset):
            raise ConfigError(f"reference must be a Dataset of (image, label) items, or null for the training data, "
                              f"got {type(reference).__name__}")
        self.layer_given = layer
        self.k, self.num_mistakes, self.bank_size, self.bank_seed = k, num_mistakes, bank_size, bank_seed
        self.metric, self.pool, self.reference, self.batch_size = metric, pool, reference, batch_size
        self.num_suspects, self.projector = num_suspects, projector
        self.projector_every_n_epochs, self.projector_max_points = projector_every_n_epochs, projector_max_points
        self.projector_image_size, self.tile_size = projector_image_size, tile_size
        self.source: FeatureSource | None = None
        #: the merged collection of the last validation pass (rank zero), and its epoch
        self.collection: dict | None = None
        self.collected_epoch: int | None = None
        #: what the last drawing computed (for tests and users): see `visualize`
        self.result: dict | None = None
        #: seconds of the last epoch's parts: collect (this rank, during validation), bank, knn, draw
        self.timings: dict[str, float] = {}
        self._pending: torch.Tensor | None = None
        self._acc: dict | None = None
        self._reference: Reference | None = None
        self._reference_known = False

    # -- set up ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.layer_given is not None:
            get_layer(self.net(pl_module), self.layer_given)  # a LayerError naming the valid layers

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        image = self.probe_images[:1].to(pl_module.device)
        self.source = feature_source(self.net(pl_module), image, self.layer_given)

    # -- which epochs collect ----------------------------------------------------------------------
    def _collects(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or trainer.fast_dev_run or self.probe_images is None or self.source is None:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True  # an offline run (visualize.py)
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        if self.every_n_epochs == 0:
            return trainer.max_epochs is None or trainer.max_epochs < 0 \
                or trainer.current_epoch + 1 >= trainer.max_epochs
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _projector_due(self, trainer: pl.Trainer) -> bool:
        if not self.projector:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING or self.every_n_epochs == 0:
            return True
        drawn = (trainer.current_epoch + 1) // self.every_n_epochs  # this is the drawn-th drawing
        return drawn % self.projector_every_n_epochs == 0

    # -- collecting during validation ------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if not self._collects(trainer):
            return
        start = time.perf_counter()
        net = self.net(pl_module)
        world = max(1, int(trainer.world_size))
        capacity = min(self.projector_max_points, sprite_capacity(self.projector_image_size, SPRITE_LIMIT)) \
            if self._projector_due(trainer) else 0
        self._acc = {"preds": [], "labels": [], "confidence": [], "order": [], "ids": [], "classes": None,
                     "m_features": [], "m_preds": [], "m_labels": [], "m_confidence": [], "m_order": [],
                     "m_ids": [], "top": None, "projector": None, "capacity": capacity, "seen": 0,
                     "batches": 0, "skipped": 0, "unlabelled": 0, "rank": int(trainer.global_rank),
                     "world": world, "dedupe": world > 1}
        self.timings = {"collect": 0.0}
        head = get_layer(net, self.source.head)
        pool = self.pool

        def head_hook(_module, args, out):
            t0 = time.perf_counter()
            if torch.is_tensor(out) and out.dim() >= 2:
                if self.source.side == "input":
                    features = pool_features(args[0], pool)
                elif self.source.layer == self.source.head:
                    features = pool_features(out, pool)
                else:
                    features, self._pending = self._pending, None
                if features is not None:
                    self._records.append({"logits": out.detach().reshape(out.shape[0], -1).float(),
                                          "features": features})
            self.timings["collect"] += time.perf_counter() - t0

        self._handles = [head.register_forward_hook(head_hook)]
        if self.source.side == "output" and self.source.layer != self.source.head:
            def layer_hook(_module, _args, out):
                t0 = time.perf_counter()
                if torch.is_tensor(out):
                    self._pending = pool_features(out, pool)
                self.timings["collect"] += time.perf_counter() - t0

            self._handles.append(get_layer(net, self.source.layer).register_forward_hook(layer_hook))
        self.timings["collect"] += time.perf_counter() - start

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._handles:
            self._records, self._pending = [], None  # only this batch's forward passes count

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._handles or self._acc is None:
            return
        start = time.perf_counter()
        records, self._records, self._pending = self._records, [], None
        acc = self._acc
        images, labels = split_batch(batch, self.batch_keys, "a validation batch")
        acc["batches"] += 1
        record = next((r for r in records if r["logits"].shape[0] == images.shape[0]), None)
        if labels is None or record is None:
            acc["unlabelled" if labels is None else "skipped"] += 1
            self.timings["collect"] += time.perf_counter() - start
            return
        logits, features = record["logits"], record["features"]
        labels = labels.to(logits.device).long()
        acc["classes"] = logits.shape[1]
        confidence, preds = logits.softmax(1).max(1)
        n = len(labels)
        seen = acc["seen"]
        # the dataset position under a sequential sampler (DDP: rank r holds r, r+W, r+2W, ...)
        order = (torch.arange(seen, seen + n) * acc["world"] + acc["rank"])
        acc["seen"] += n
        need_ids = acc["dedupe"] or acc["capacity"] > 0
        ids = content_ids(images).cpu() if need_ids else None
        acc["preds"].append(preds.cpu())
        acc["labels"].append(labels.cpu())
        acc["confidence"].append(confidence.cpu())
        acc["order"].append(order)
        if acc["dedupe"]:
            acc["ids"].append(ids)
        wrong = (preds != labels).cpu()
        if wrong.any():
            rows = wrong.nonzero().flatten()
            acc["m_features"].append(features.cpu()[rows])
            acc["m_preds"].append(preds.cpu()[rows])
            acc["m_labels"].append(labels.cpu()[rows])
            acc["m_confidence"].append(confidence.cpu()[rows])
            acc["m_order"].append(order[rows])
            if acc["dedupe"]:
                acc["m_ids"].append(ids[rows])
            self._keep_top(images[rows.to(images.device)], confidence.cpu()[rows], order[rows])
        if acc["capacity"]:
            self._keep_projected(trainer, images, features.cpu(), labels.cpu(), preds.cpu(), ids)
        self.timings["collect"] += time.perf_counter() - start

    def _keep_top(self, images: torch.Tensor, confidence: torch.Tensor, order: torch.Tensor) -> None:
        """The images of the `num_mistakes` most confident mistakes so far (CPU, model input space)."""
        top = self._acc["top"]
        images = images.detach().cpu().clone()
        if top is not None:
            images = torch.cat([top["images"], images])
            confidence, order = torch.cat([top["confidence"], confidence]), torch.cat([top["order"], order])
        keep = _by_confidence(confidence, order)[: self.num_mistakes]
        self._acc["top"] = {"images": images[keep], "confidence": confidence[keep], "order": order[keep]}

    def _keep_projected(self, trainer, images, features, labels, preds, ids) -> None:
        """A fixed subset of at most `capacity` validation images for the projector: the smallest
        content hashes, whatever the order or the rank they come in."""
        acc, cap = self._acc, self._acc["capacity"]
        kept = acc["projector"]
        if kept is not None and len(kept["ids"]) >= cap:
            enter = ids < kept["ids"].max()
            if not enter.any():
                return
        else:
            enter = torch.ones(len(ids), dtype=torch.bool)
        rows = enter.nonzero().flatten()
        pixels = to_pixels(images[rows.to(images.device)], self.normalization(trainer))
        thumbs = (_thumbnails(pixels, self.projector_image_size) * 255).round().clamp(0, 255).to(torch.uint8)
        new = {"ids": ids[rows], "features": features[rows], "labels": labels[rows], "preds": preds[rows],
               "thumbs": thumbs}
        if kept is not None:
            new = {key: torch.cat([kept[key], new[key]]) for key in new}
        keep = new["ids"].argsort(stable=True)[:cap]
        acc["projector"] = {key: value[keep] for key, value in new.items()}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        start = time.perf_counter()
        gathered = self.gather(trainer, self._finish(self._acc))
        self._acc = None
        if trainer.is_global_zero:
            self.collection = _merge(gathered, self.num_mistakes)
            self.collected_epoch = trainer.current_epoch
        self.timings["collect"] += time.perf_counter() - start

    @staticmethod
    def _finish(acc: dict) -> dict:
        """One rank's lists as tensors (CPU), ready to be gathered."""
        def cat(key, empty):
            return torch.cat(acc[key]) if acc[key] else empty

        long, flt = torch.empty(0, dtype=torch.long), torch.empty(0)
        return {"preds": cat("preds", long), "labels": cat("labels", long), "confidence": cat("confidence", flt),
                "order": cat("order", long), "ids": cat("ids", long) if acc["dedupe"] else None,
                "classes": acc["classes"], "m_features": cat("m_features", torch.empty(0, 0)),
                "m_preds": cat("m_preds", long), "m_labels": cat("m_labels", long),
                "m_confidence": cat("m_confidence", flt), "m_order": cat("m_order", long),
                "m_ids": cat("m_ids", long) if acc["dedupe"] else None, "top": acc["top"],
                "projector": acc["projector"], "capacity": acc["capacity"], "seen": acc["seen"],
                "batches": acc["batches"], "skipped": acc["skipped"], "unlabelled": acc["unlabelled"]}

    def _remove_hooks(self) -> None:
        super()._remove_hooks()
        self._pending = None

    # -- the reference bank --------------------------------------------------------------------------
    def reference_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Reference | None:
        """Where the bank's images come from (see the module docstring); None when there is nothing
        to read (said once)."""
        if self._reference_known:
            return self._reference
        self._reference_known = True
        self._reference = self._find_reference(trainer, pl_module)
        if self._reference is None:
            self._warn_once(f"{type(self).__name__}: no training data to find neighbours in (no training dataloader "
                            "with a map-style dataset, no datamodule train_set); the mistakes are drawn without "
                            "neighbours. Pass reference=<Dataset of (image, label)> to compare with")
        return self._reference

    def _find_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Reference | None:
        if self.reference is not None:
            return self._dataset_reference(self.reference, pl_module, None, "reference= (as given)")
        dm = getattr(trainer, "datamodule", None)
        split = getattr(dm, "train_set", None) if dm is not None else None
        normalization = getattr(dm, "normalization", None) if dm is not None else None
        if torch.is_tensor(getattr(split, "images", None)) and torch.is_tensor(getattr(split, "labels", None)) \
                and callable(normalization):
            def read(rows: torch.Tensor):
                images = split.images[rows.to(split.images.device)].to(pl_module.device)
                return normalization(images), split.labels[rows.to(split.labels.device)].to(pl_module.device)

            return Reference(len(split.labels), read, "the datamodule's training split through its validation "
                                                      "transform (normalization, no augmentation)")
        loader = _first_loader(getattr(trainer, "train_dataloader", None))
        if loader is None and dm is not None and trainer.state.fn == TrainerFn.VALIDATING:
            with contextlib.suppress(Exception):  # a datamodule without training data
                loader = _first_loader(dm.train_dataloader())
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            return None
        try:
            len(dataset)
        except TypeError:
            return None
        owner = _transform_owner(dataset)
        description = "the training dataset as it is (it has no transforms)"
        if owner is not None and owner.transform is not None:
            val_owner = _transform_owner(val_dataset(trainer))
            if val_owner is not None and val_owner.transform is not owner.transform:
                dataset = with_transform(dataset, val_owner.transform)
                description = "the training dataset with the validation dataset's transform"
            elif val_owner is not None:
                description = "the training dataset, whose transform the validation dataset shares"
            else:
                description = "the training dataset with its training transforms"
                self._warn_once(f"{type(self).__name__}: the validation dataset shows no transform to use instead of "
                                "the training dataset's, so the reference bank is computed with the training "
                                "transforms (random augmentation makes its features noisier); pass "
                                "reference=<the training set with the validation transforms> to avoid it")
        return self._dataset_reference(dataset, pl_module, loader, description)

    def _dataset_reference(self, dataset: Dataset, pl_module, loader, description: str) -> Reference:
        collate = getattr(loader, "collate_fn", None) or default_collate
        workers = getattr(loader, "num_workers", 0) or 0
        keys = self.batch_keys

        def read(rows: torch.Tensor):
            images, labels = [], []
            data = DataLoader(Subset(dataset, rows.tolist()), batch_size=self.batch_size, shuffle=False,
                              num_workers=workers, collate_fn=collate)
            for batch in data:
                x, y = split_batch(transfer_batch(pl_module, batch), keys, "a reference batch")
                if y is None:
                    raise ConfigError(f"{type(self).__name__}: the reference images carry no labels; pass "
                                      "reference=<Dataset of (image, label)> or batch_keys=(image_key, label_key)")
                images.append(x.to(pl_module.device))
                labels.append(torch.as_tensor(y).long().to(pl_module.device))
            return torch.cat(images), torch.cat(labels)

        return Reference(len(dataset), read, description)

    def bank_rows(self, size: int) -> torch.Tensor:
        """The dataset rows of the bank: a seeded subset of `bank_size` of the `size` rows, sorted
        (all rows when there are fewer); the same every epoch."""
        if self.bank_size >= size:
            return torch.arange(size)
        g = torch.Generator().manual_seed(self.bank_seed)
        return torch.randperm(size, generator=g)[: self.bank_size].sort().values

    def compute_bank(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reference: Reference):
        """(features [N, D] on the module's device, labels [N], dataset rows [N]) of the bank, in eval
        mode, under the validation step's precision."""
        net = self.net(pl_module)
        rows = self.bank_rows(reference.size)
        context = getattr(getattr(trainer, "precision_plugin", None), "val_step_context", contextlib.nullcontext)
        features, labels = [], []
        for s in range(0, len(rows), self.batch_size):
            images, y = reference.read(rows[s:s + self.batch_size])
            with context():
                features.append(layer_features(net, images, pool=self.pool, source=self.source))
            labels.append(y)
        return torch.cat(features), torch.cat(labels).cpu(), rows

    # -- drawing ------------------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.collection is None or not self.collected_now(trainer, self.collected_epoch, "mistakes are drawn"):
            return
        c = self.collection
        if c["unlabelled"] and not c["preds"].numel():
            self._warn_once(f"{type(self).__name__}: the validation batches carry no labels, so there are no mistakes "
                            "to find; give the validation loader (image, label) batches, or batch_keys=(image_key, "
                            "label_key) for dict batches")
            return
        if c["skipped"]:
            self._warn_once(f"{type(self).__name__}: in {c['skipped']} of {c['batches']} validation batches the "
                            f"classifier head {self.source.head!r} ran on no batch of the validation batch's size "
                            "(validation_step does not call the net on the batch?); those batches are left out")
        if not c["preds"].numel():
            return
        names = list(self.class_names(trainer))
        classes = max(c["classes"] or 0, int(c["labels"].max()) + 1, int(c["preds"].max()) + 1)
        names += [str(i) for i in range(len(names), classes)]
        matrix = confusion_matrix(c["preds"], c["labels"], classes)
        accuracy = class_accuracy(matrix)
        order = rank_mistakes(c["m_preds"], c["m_labels"], c["m_confidence"])  # all mistakes, ranked
        scalars = {f"{self.name}/count": float(len(order))}
        result = {"epoch": trainer.current_epoch, "confusion": matrix, "class_accuracy": accuracy,
                  "mistake_order": c["m_order"][order], "mistake_confidence": c["m_confidence"][order],
                  "mistake_preds": c["m_preds"][order], "mistake_labels": c["m_labels"][order],
                  "neighbours": None, "distances": None, "disagree": None, "suspects": None,
                  "suspect_counts": None, "bank_rows": None, "disagreement": None, "projector": None,
                  "reference": None}
        reference = self.reference_source(trainer, pl_module)
        neighbour_images = suspect_images = None
        if reference is not None:
            t0 = time.perf_counter()
            bank, bank_labels, rows = self.compute_bank(trainer, pl_module, reference)
            self.timings["bank"] = time.perf_counter() - t0
            result["reference"], result["bank_rows"] = reference.description, rows
            if len(order):
                t0 = time.perf_counter()
                distances, nearest = knn(c["m_features"][order], bank, self.k, self.metric)
                distances, nearest = distances.cpu(), nearest.cpu()
                self.timings["knn"] = time.perf_counter() - t0
                neighbour_labels = bank_labels[nearest]
                disagree = neighbour_labels != result["mistake_labels"][:, None]
                sus, counts = suspects(nearest, disagree, self.num_suspects or None)
                result.update(neighbours=rows[nearest], neighbour_labels=neighbour_labels, distances=distances,
                              disagree=disagree, suspects=rows[sus], suspect_labels=bank_labels[sus],
                              suspect_counts=counts,
                              disagreement=float(disagree.float().mean()))
                scalars[f"{self.name}/neighbour_disagreement"] = result["disagreement"]
                drawn = rows[nearest[: self.num_mistakes]]
                wanted = torch.cat([drawn.flatten(), rows[sus][: self.num_suspects]]) if self.num_suspects \
                    else drawn.flatten()
                if wanted.numel():
                    unique, inverse = wanted.unique(return_inverse=True)
                    images, _ = reference.read(unique)
                    images = images[inverse.to(images.device)]
                    neighbour_images = images[: drawn.numel()].view(*drawn.shape, *images.shape[1:])
                    suspect_images = images[drawn.numel():]
        if len(names) <= MAX_CLASS_SCALARS:
            for cls, value in enumerate(accuracy.tolist()):
                if not math.isnan(value):
                    scalars[f"{self.name}/class_acc/{_safe_tag(names[cls])}"] = value
        else:
            self._warn_once(f"{type(self).__name__}: {len(names)} classes: per-class accuracy scalars are logged for "
                            f"at most {MAX_CLASS_SCALARS} classes; see mistakes/confusion")
        t0 = time.perf_counter()
        normalization = self.normalization(trainer)
        if len(order):
            self.log_image(trainer, f"{self.name}/nearest",
                           self.render_rows(c, order, result, neighbour_images, names, normalization))
        if suspect_images is not None and len(suspect_images):
            self.log_image(trainer, f"{self.name}/suspects",
                           self.render_suspects(suspect_images, result, names, normalization))
        self.log_image(trainer, f"{self.name}/confusion", render_confusion(matrix, names, self.tile_size))
        self.log_scalars(trainer, scalars)
        self.log_scalars(trainer, {f"viz_time/{self.name}_collect": self.timings.get("collect", 0.0)})
        if c["projector"] is not None:
            result["projector"] = self.write_projector(trainer, c, names)
        self.timings["draw"] = time.perf_counter() - t0
        self.result = result

    def render_rows(self, c: dict, order: torch.Tensor, result: dict, neighbour_images, names: Sequence[str],
                    normalization) -> torch.Tensor:
        """Row i: the i-th most confident mistake, then its neighbours (red frame and `*`: a
        label that differs from the mistake's true label)."""
        top = c["top"]
        m = min(self.num_mistakes, len(order))
        # the top images were kept in the same ranking (confidence, then order)
        queries = _shrunk(as_rgb(to_pixels(top["images"][:m], normalization)), self.tile_size)
        width = tile_width(queries, self.tile_size)
        tiles, captions = [], []
        k = 0 if neighbour_images is None else neighbour_images.shape[1]
        if k:
            shown = _shrunk(as_rgb(to_pixels(neighbour_images[:m].flatten(0, 1), normalization)), self.tile_size)
            shown = _framed(shown, result["disagree"][:m].flatten())
            shown = shown.view(m, k, *shown.shape[1:])
        for i in range(m):
            true, pred = int(result["mistake_labels"][i]), int(result["mistake_preds"][i])
            confidence = float(result["mistake_confidence"][i])
            tiles.append(queries[i:i + 1])
            captions.append(fit_caption(class_caption(true, names), width) + "\n"
                            + fit_caption(f"as {class_caption(pred, names)} {confidence:.0%}", width))
            for j in range(k):
                differs = bool(result["disagree"][i, j])
                label = class_caption(result["neighbour_labels"][i, j], names) + ("*" if differs else "")
                tiles.append(shown[i, j:j + 1])
                captions.append(fit_caption(label, width) + "\n" + f"d {float(result['distances'][i, j]):.3g}")
        grid = captioned_grid(torch.cat(tiles), nrow=1 + k, captions=captions,
                              row_titles=[f"#{i + 1}" for i in range(m)],
                              col_titles=["mistake"] + [f"nn {j + 1}" for j in range(k)], tile_size=self.tile_size)
        if not k:
            return grid
        return stack_vertical([grid, _notes(["* red frame: another label", "than the true class",
                                              f"d: {self.metric} distance"], grid.shape[-1])])

    def render_suspects(self, images: torch.Tensor, result: dict, names: Sequence[str], normalization) -> torch.Tensor:
        pixels = _shrunk(as_rgb(to_pixels(images, normalization)), self.tile_size)
        width = tile_width(pixels, self.tile_size)
        captions = [fit_caption(class_caption(y, names), width) + "\n" + fit_caption(f"{int(n)}x #{int(r)}", width)
                    for r, y, n in zip(result["suspects"], result["suspect_labels"], result["suspect_counts"])]
        nrow = max(1, min(len(pixels), 8))
        grid = captioned_grid(pixels, nrow=nrow, captions=captions, tile_size=self.tile_size)
        return stack_vertical([grid, _notes(["most often a neighbour", "of a mistake of another class:",
                                             "label, count, #dataset row"], grid.shape[-1])])

    def write_projector(self, trainer: pl.Trainer, c: dict, names: Sequence[str]) -> dict | None:
        """The kept validation features, labels, predictions and thumbnails to every TensorBoardLogger's
        embedding projector; {points, seen} or None when no logger takes it."""
        kept = c["projector"]
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            self._warn_once(f"{type(self).__name__}: projector=true needs a TensorBoardLogger (the embedding projector "
                            "is TensorBoard's); not written")
            return None
        points, seen = len(kept["ids"]), c["seen"]
        if points < seen:
            self._warn_once(f"{type(self).__name__}: the embedding projector shows {points} of the {seen} validation "
                            f"images (a fixed subset: at most projector_max_points={self.projector_max_points}, and "
                            f"{self.projector_image_size}-px thumbnails must fit the projector's {SPRITE_LIMIT}x"
                            f"{SPRITE_LIMIT} px sprite)")
        metadata = [[class_caption(y, names), class_caption(p, names)]
                    for y, p in zip(kept["labels"].tolist(), kept["preds"].tolist())]
        images = kept["thumbs"].float() / 255
        step = log_step(trainer)
        for lg in loggers:
            try:
                lg.experiment.add_embedding(kept["features"], metadata=metadata, label_img=images, global_step=step,
                                            tag=f"{self.name}/projector", metadata_header=["label", "predicted"])
            except Exception as e:  # noqa: BLE001  a logger that cannot write: said once, training goes on
                self._warn_once(f"{type(self).__name__}: the embedding projector could not be written "
                                f"({one_line(e)}); training goes on")
        return {"points": points, "seen": seen, "sprite_side": math.ceil(math.sqrt(points)) * images.shape[-1]}


def _by_confidence(confidence: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Indices ranked by confidence (highest first), ties by the lower dataset order."""
    by_order = order.argsort(stable=True)
    return by_order[confidence[by_order].float().argsort(descending=True, stable=True)]


def _merge(states: list[dict], num_mistakes: int) -> dict:
    """The ranks' collections as one (images seen by two ranks, as DDP's padding repeats them,
    counted once), in dataset order."""
    if len(states) == 1:
        return dict(states[0])

    def cat(key):
        parts = [s[key] for s in states if s[key] is not None and s[key].numel()]
        return torch.cat(parts) if parts else states[0][key]

    merged = {key: cat(key) for key in ("preds", "labels", "confidence", "order", "ids", "m_preds", "m_labels",
                                        "m_confidence", "m_order", "m_ids")}
    feats = [s["m_features"] for s in states if s["m_features"].numel()]
    merged["m_features"] = torch.cat(feats) if feats else states[0]["m_features"]
    for prefix in ("", "m_"):
        ids = merged[f"{prefix}ids"]
        if ids is None or not ids.numel():
            continue
        first = _first_of_each(ids)
        keys = ["preds", "labels", "confidence", "order", "ids"]
        for key in keys + (["features"] if prefix else []):
            merged[f"{prefix}{key}"] = merged[f"{prefix}{key}"][first]
    for prefix, extra in (("", ()), ("m_", ("features",))):  # dataset order, as one process would see it
        sort = merged[f"{prefix}order"].argsort()
        for key in ("preds", "labels", "confidence", "order", "ids") + extra:
            if merged[f"{prefix}{key}"] is not None and len(merged[f"{prefix}{key}"]) == len(sort):
                merged[f"{prefix}{key}"] = merged[f"{prefix}{key}"][sort]
    tops = [s["top"] for s in states if s["top"] is not None]
    top = None
    if tops:
        images = torch.cat([t["images"] for t in tops])
        confidence, order = torch.cat([t["confidence"] for t in tops]), torch.cat([t["order"] for t in tops])
        _, unique = _unique_first(order)
        keep = unique[_by_confidence(confidence[unique], order[unique])][:num_mistakes]
        top = {"images": images[keep], "confidence": confidence[keep], "order": order[keep]}
    merged["top"] = top
    projected = [s["projector"] for s in states if s["projector"] is not None]
    if projected:
        joined = {key: torch.cat([p[key] for p in projected]) for key in projected[0]}
        first = _first_of_each(joined["ids"])
        joined = {key: value[first] for key, value in joined.items()}
        keep = joined["ids"].argsort(stable=True)[: states[0]["capacity"]]
        merged["projector"] = {key: value[keep] for key, value in joined.items()}
    else:
        merged["projector"] = None
    merged["classes"] = max((s["classes"] or 0) for s in states) or None
    merged["capacity"] = states[0]["capacity"]
    merged["seen"] = len(merged["preds"])
    for key in ("batches", "skipped", "unlabelled"):
        merged[key] = sum(s[key] for s in states)
    return merged


def _unique_first(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique values, index of the first occurrence of each)."""
    unique, inverse = values.unique(return_inverse=True)
    first = torch.full((len(unique),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return unique, first


def _first_of_each(ids: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each id, in their original order."""
    return _unique_first(ids)[1].sort().values


def render_confusion(matrix: torch.Tensor, names: Sequence[str], tile_size: int = 64) -> torch.Tensor:
    """[3, H, W]: rows = true class, columns = predicted class; colour = the fraction of the row
    (a fixed 0..1 scale), the count written under each cell (up to `MAX_CONFUSION_CELLS` classes;
    beyond that one heat map without numbers)."""
    c = matrix.shape[0]
    rows = matrix.sum(1, keepdim=True).clamp_min(1)
    fraction = (matrix.double() / rows).float()
    if c > MAX_CONFUSION_CELLS:
        image = heatmap(fraction[None], "Blues", 0.0, 1.0)
        grid = captioned_grid(image, nrow=1, captions=[f"{c} classes: rows true, columns predicted"],
                              tile_size=max(c, 480))
    else:
        cell = max(16, min(tile_size, 40))
        tiles = heatmap(fraction.view(-1, 1, 1), "Blues", 0.0, 1.0)
        captions = [str(int(v)) for v in matrix.flatten()]
        width = max(12, 8 + 6 * max(len(str(n)) for n in names))
        row_titles = [name if name == str(i) else f"{name} ({i})" for i in range(c)
                      for name in [fit_caption(class_caption(i, names), min(width, 96)).replace("\n", " ")]]
        grid = captioned_grid(tiles, nrow=c, captions=captions, row_titles=row_titles,
                              col_titles=[str(i) for i in range(c)], tile_size=cell)
    scale = colorbar("Blues", 0, 1, min(grid.shape[-1], 320), "fraction of the true class (row)")
    return stack_vertical([grid, scale, _notes(["rows: true class", "columns: predicted"], grid.shape[-1], red=False)])


def _notes(texts: Sequence[str], width: int, red: bool = True) -> torch.Tensor:
    """Short notes under a grid (wrapping between notes), the first with a red swatch."""
    colors = torch.ones(len(texts), 3)
    if red:
        colors[0] = torch.tensor(DIFFERS_COLOR)
    return legend(list(texts), colors, max(width, 1))
