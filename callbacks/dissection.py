"""UnitDissection: every unit of the chosen layers characterized each epoch, from the validation pass
Lightning runs anyway: Neuron Features and selectivity indexes.

Follows Rafegas, Vanrell, Alexandre & Arias, "Understanding trained CNNs by indexing neuron
selectivity", Pattern Recognition Letters 136:318-325, 2020 (doi 10.1016/j.patrec.2019.10.013),
the "Neuron Analysis" of Vanrell & Arias's lecture, and Morcos et al. 2018 (arXiv:1803.06959) for
a class selectivity over the whole validation set. The measures and their definitions are
`viz.dissection`; this callback collects, calls it, renders and logs.

Collection, as `TopActivations` collects: during the validation loop of each due epoch (not the
sanity check), forward hooks added at validation epoch start (on the net, for its input images,
and on each layer, for every unit's spatial maximum and its position) and removed at its end;
each batch updates a `viz.dissection.UnitCollector` (top-N per unit with the image's label, per
class sums for the class means, the images the top entries refer to) in `on_validation_batch_end`.
No extra forward over the data. Memory: per layer units x N entries (value, id, position, label),
8 bytes per validation image (its content id), the images the top entries refer to, at most
min(validation images, sum over layers of units x N), and the last few batches, whose top-N update
waits to be made over them together (`UnitCollector.flush_rows`, `flush_bytes`: 1,024 rows or
64 MiB of images); a smaller `n` bounds it for big layers.
Under DDP every rank collects its share; the states are gathered at validation epoch end
(`all_gather_object`: first the small states, then only the images the merged top-N refers to)
and merged, which gives what one process over the whole validation set would (`UnitCollector.merge`).

Drawn after validation (`on_train_epoch_end`, at the step of the epoch's validation scalars), on
rank zero: the measures (`viz.dissection.dissect`; the colour index runs each distinct image the
top entries refer to once more, greyed: its only extra forward, counted in `viz_time/dissection`),
then
- `dissection/<layer>`: the Neuron Feature of every unit, sorted by `sort_by` (most selective
  first, undefined last), captioned `#unit top-class` / `class-index colour-index` / `csi <CSI>`
  (`-` where undefined); NFs are in display space (true colours, not rescaled), light blue where no
  crop reaches, white for a dead unit; as many as a card shows (on LeNet's 500-unit conv3, the
  most selective rows that fit), with a note under them of how many are left out;
- histograms `dissection_class/<layer>`, `dissection_color/<layer>`, `dissection_csi/<layer>` of
  each index over the layer's units (the step slider shows them move over epochs);
- scalars `dissection_mean_class/<layer>`, `dissection_mean_color/<layer>`, `dissection_mean_csi/<layer>`
  (means over the live units) and `dissection_dead/<layer>` (the fraction of dead units), and
  `viz_time/dissection_collect` (this rank's seconds collecting during the validation loop);
- a text summary `dissection_table/<layer>` (a markdown table of every unit) and the CSV file
  `<log dir>/dissection/units.csv`, one row per unit and epoch (columns `CSV_COLUMNS`; rewritten
  atomically each epoch, so a resumed run replaces the epochs it repeats);
- at fit end, `dissection_strip/<layer>`: the NFs of the `strip_units` most selective units (by
  `sort_by`, at the last epoch) over the epochs drawn (rows = units, columns = epochs).
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from convlens.callbacks import sink
from convlens.callbacks.collect import ValidationCollector
from convlens.callbacks.display import color_outside
from convlens.callbacks.lightning_compat import log_step
from convlens.callbacks.options import check_choice, check_int
from convlens.callbacks.probe import split_batch
from convlens.errors import ConfigError, ConvlensError
from convlens.render import as_rgb, captioned_grid, columns_that_fit, downscale_factor, fit_caption, tile_width
from convlens.viz.common import VizError
from convlens.viz.dissection import (CLASS_THRESHOLD, DEFAULT_N, POPULATION_THRESHOLD, UnitCollector, UnitTable,
                                     dissect)
from convlens.viz.layers import default_conv_layers, get_layer, layer_names
from convlens.viz.receptive_field import ReceptiveField, receptive_field

#: the indexes a grid can be sorted by (UnitTable attributes), and "unit" (the unit's index)
SORT_KEYS = ("class_selectivity", "color_selectivity", "csi", "unit")
#: the columns of units.csv (`top_class` the class index, empty cells where a value is undefined)
CSV_COLUMNS = ("epoch", "layer", "unit", "class_selectivity", "color_selectivity", "csi", "top_class",
               "top_class_name", "top_class_frequency", "population_code", "population_classes", "dead",
               "top_activation", "top_images")
#: NFs kept for the fit-end strip are stored as uint8 tiles of at most this side
HISTORY_SIDE = 24
#: (histogram/scalar short name, UnitTable attribute)
INDEXES = (("class", "class_selectivity"), ("color", "color_selectivity"), ("csi", "csi"))


def _short(x: float) -> str:
    """0.97 -> '.97', -0.12 -> '-.12', NaN -> '-' (captions are a few characters wide)."""
    if not math.isfinite(x):
        return "-"
    text = f"{x:.2f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def _cell(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6g}"


def _lists(table: UnitTable) -> dict[str, list]:
    """The per-unit columns of `table` as Python lists (one conversion, not one per unit and value)."""
    return {"class_selectivity": table.class_selectivity.tolist(),
            "color_selectivity": table.color_selectivity.tolist(),
            "csi": table.csi.tolist(), "top_class": table.top_class.tolist(), "dead": table.dead.tolist(),
            "population_code": table.population_code.tolist(), "top_images": table.filled.sum(1).tolist(),
            "top_activation": [v if f else math.nan for v, f in zip(table.values[:, 0].tolist(),
                                                                      table.filled[:, 0].tolist())],
            "top_class_frequency": table.frequencies.gather(1, table.top_class.clamp_min(0)[:, None])[:, 0].tolist()}


def sort_order(table: UnitTable, key: str) -> list[int]:
    """Units most selective first by `key` (undefined last; ties: lower unit first), or by index."""
    if key == "unit":
        return list(range(table.num_units))
    values = getattr(table, key).tolist()
    return sorted(range(len(values)), key=lambda u: (not math.isfinite(values[u]), -values[u]
                                                      if math.isfinite(values[u]) else 0, u))


def nf_tiles(table: UnitTable) -> torch.Tensor:
    """[U, 3, Ph, Pw] in [0, 1]: the NFs, light blue where no crop reaches, white for dead units."""
    nf = table.neuron_features
    tiles = color_outside(as_rgb(nf.float()))
    tiles[table.dead] = 1.0
    return tiles.clamp(0, 1)


class UnitDissection(ValidationCollector):
    """Every unit of the chosen layers, each epoch: Neuron Feature, class and colour selectivity
    (Rafegas et al. 2020), Morcos et al.'s class selectivity, dead units (`dissection/<layer>` and
    the tags of the module docstring; a CSV of every unit under the log dir).

    Args:
        layers: Conv2d names of the net (None: every conv of a plain chain such as LeNet, the CIFAR
            nets or VGG; one conv per stage of other nets, `viz.layers.default_conv_layers`).
        n: top images per unit (the paper's N = 100).
        class_threshold: the share of a unit's weighted class frequencies the class index's M
            classes must cover (in (0, 1]; the authors' tool's default 1.0).
        population_threshold: a class is in a unit's population code when its weighted relative
            frequency is at least this (the authors' tool's default 0.1).
        color: compute the colour selectivity index (one forward of each distinct top image,
            greyed); undefined, and skipped with one warning, on images that are not RGB.
        sort_by: the index the NF grids are sorted by: class_selectivity, color_selectivity, csi
            or unit.
        strip_units: units per layer in the fit-end strip of NFs over epochs (0: no strip).
        tile_size: NF tiles are scaled (nearest, integer factor) to about this many pixels.
        color_batch_size: images per forward of the colour index.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec` (one probe image gives the
            receptive-field geometry; `batch_keys` reads the labels of dict batches).
    """

    name = "dissection"
    layer_kind = nn.Conv2d
    state_key_options = ("layers", "n")

    def __init__(self, layers: Sequence[str] | None = None, n: int = DEFAULT_N,
                 class_threshold: float = CLASS_THRESHOLD, population_threshold: float = POPULATION_THRESHOLD,
                 color: bool = True, sort_by: str = "class_selectivity", strip_units: int = 8, tile_size: int = 48,
                 color_batch_size: int = 64, every_n_epochs: int | None = None, **probe_options):
        super().__init__(layers=layers, every_n_epochs=every_n_epochs, **probe_options)
        check_int("n (top images per unit)", n, 1)
        check_int("strip_units", strip_units, 0, " (0: no strip at fit end)")
        check_int("tile_size (pixels)", tile_size, 1)
        check_int("color_batch_size", color_batch_size, 1)
        check_choice("sort_by", sort_by, SORT_KEYS)
        for option, value, low in (("class_threshold", class_threshold, 0.0),
                                   ("population_threshold", population_threshold, -1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= 1:
                raise ConfigError(f"{option} must be a number in {'(0' if low == 0 else '[0'}, 1] (a share of a "
                                  f"unit's weighted class frequencies), got {value!r}")
        if population_threshold < 0:
            raise ConfigError(f"population_threshold must be a number in [0, 1], got {population_threshold!r}")
        if not isinstance(color, bool):
            raise ConfigError(f"color must be true or false, got {color!r}")
        self.n, self.class_threshold, self.population_threshold = n, float(class_threshold), float(population_threshold)
        self.color, self.sort_by, self.strip_units, self.tile_size = color, sort_by, strip_units, tile_size
        self.color_batch_size = color_batch_size
        self.fields: dict[str, ReceptiveField] = {}
        #: the merged collection of the last validation pass (rank zero), until it is drawn
        self.result: UnitCollector | None = None
        self.result_epoch: int | None = None
        #: the tables of the last epoch drawn
        self.tables: dict[str, UnitTable] = {}
        #: {layer: [(epoch, uint8 [U, 3, h, w] NFs)]}, for the fit-end strip
        self.history: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._collector: UnitCollector | None = None

    # -- layers ------------------------------------------------------------------------------------
    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        convs = layer_names(net, nn.Conv2d)
        if image is not None and convs:
            try:
                self.fields[convs[-1]] = receptive_field(net, image, convs[-1], path="chain")
                return convs  # a plain chain: every conv
            except VizError:
                pass
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        problems = {}
        for layer in layers:
            try:
                self._field(net, image, layer)
            except VizError as e:
                problems[layer] = " ".join(str(e).split())
        return problems

    def _field(self, net: nn.Module, image: torch.Tensor, layer: str) -> ReceptiveField:
        field = self.fields.get(layer)
        if field is None or field.input_size != tuple(image.shape[-2:]):
            field = self.fields[layer] = receptive_field(net, image, layer)
        return field

    # -- collecting during validation -----------------------------------------------------------
    def start_collecting(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> None:
        image = self.probe_images[:1].to(pl_module.device)
        self.fields = {layer: self._field(net, image, layer) for layer in self.layers}
        self._collector = UnitCollector({layer: get_layer(net, layer).out_channels for layer in self.layers}, self.n)
        # every unit's maximum, and where it is for the maxima that may enter a top
        self.attach_maxima_hooks(net, thresholds=self._collector.thresholds)

    def take_records(self, records: list[dict], batch: Any) -> None:
        try:
            _, labels = split_batch(batch, self.batch_keys)
        except ConvlensError:
            labels = None
        labels = labels if torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point() else None
        for record in records:
            images, maps = record["images"], record["maps"]
            if set(maps) != set(self.layers):
                continue  # a forward that did not reach every layer
            mine = labels if labels is not None and len(labels) == len(images) else None
            if mine is None:
                self._warn_once(f"{type(self).__name__}: validation batches carry no labels the callback can read "
                                "(one class index per image); the class indexes are undefined. For dict batches "
                                "pass batch_keys=(image_key, label_key)")
            self._collector.update(images, mine, maps)

    def finish_collecting(self, trainer: pl.Trainer) -> UnitCollector:
        collector, self._collector = self._collector, None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, collector.state_dict(pool=False))
            merged = UnitCollector.merge(states)
            needed = merged.referenced_ids()
            pools: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(pools, {i: x for i, x in collector.pool.items() if i in needed})
            for pool in pools:
                for i, image in pool.items():
                    merged.pool.setdefault(i, image)
        else:
            merged = collector
        return merged

    # -- measuring and drawing ------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is None or not self.collected_now(trainer, self.result_epoch, "units are dissected"):
            return
        result, self.result = self.result, None
        epoch = self.result_epoch
        if not result.seen:
            self._warn_once(f"{type(self).__name__}: the validation loop of epoch {epoch} never ran the net on an "
                            "image batch (validation_step calls no forward of the net?); nothing to dissect")
            return
        images = next(iter(result.pool.values()), None)
        rgb = images is not None and images.shape[0] == 3
        if self.color and images is not None and not rgb:
            self._warn_once(f"{type(self).__name__}: the colour selectivity index is undefined on "
                            f"{images.shape[0]}-channel images (it greys RGB); skipped, the other measures are "
                            "computed (color=false says so in the config)")
        names = list(self.class_names(trainer))
        precision = getattr(trainer, "precision_plugin", None)
        self.tables = dissect(result, self.fields, self.net(pl_module), self.normalization(trainer),
                              num_classes=len(names) or None, class_threshold=self.class_threshold,
                              population_threshold=self.population_threshold, color=self.color and rgb,
                              batch_size=self.color_batch_size,
                              context=precision.forward_context if precision is not None else None)
        step = log_step(trainer)
        scalars = {}
        for layer, table in self.tables.items():
            self.log_image(trainer, f"{self.name}/{layer}", self.grid(table, names))
            live = ~table.dead
            for short, attr in INDEXES:
                values = getattr(table, attr)
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    sink.log_histogram(trainer, f"{self.name}_{short}/{layer}", finite, step)
                    scalars[f"{self.name}_mean_{short}/{layer}"] = float(finite.mean())
            scalars[f"{self.name}_dead/{layer}"] = float(1 - live.float().mean())
            sink.log_text(trainer, f"{self.name}_table/{layer}", self.markdown(table, names), step)
            self._remember(layer, epoch, table)
        scalars[f"viz_time/{self.name}_collect"] = self.collect_seconds
        self.log_scalars(trainer, scalars)
        self.write_csv(trainer, epoch, names)

    def grid(self, table: UnitTable, names: Sequence[str]) -> torch.Tensor:
        """[3, H, W]: the units' NFs, sorted by `sort_by`, captioned (see the module docstring); as
        many as a card shows (`render.CARD_HEIGHT`), the most selective first, and a note of the
        others (every unit is in the CSV and the text table)."""
        order = sort_order(table, self.sort_by)
        tiles = nf_tiles(table)[order]
        shrink = downscale_factor(*tiles.shape[-2:], self.tile_size)
        if shrink > 1:  # big fields (VGG): averaged down so that a layer's grid stays readable
            tiles = F.avg_pool2d(tiles, shrink, ceil_mode=True)
        width = tile_width(tiles, self.tile_size)
        captions = []
        c = _lists(table)
        for u in order:
            cls = c["top_class"][u]
            name = "dead" if c["dead"][u] else (names[cls] if 0 <= cls < len(names) else str(cls))
            lines = [f"#{u} {name}", f"{_short(c['class_selectivity'][u])} "
                     f"{_short(c['color_selectivity'][u])}", f"csi {_short(c['csi'][u])}"]
            captions.append("\n".join(fit_caption(line, width) for line in lines))
        cap = (f"showing {{shown}} of {{total}} units of {table.layer}, sorted by {self.sort_by}; every unit in "
               f"units.csv and {self.name}_table/{table.layer}")
        return captioned_grid(tiles, nrow=columns_that_fit(width, len(order)), captions=captions,
                              tile_size=self.tile_size, cap=cap, flat=True)

    def markdown(self, table: UnitTable, names: Sequence[str]) -> str:
        """A markdown table of every unit, sorted by `sort_by`."""
        rows = [f"{table.layer}: every unit, sorted by {self.sort_by} (class: Rafegas et al.'s class selectivity, "
                "colour: colour selectivity, CSI: Morcos et al.)", "",
                "| unit | top class | class | colour | CSI | population | dead |", "|---|---|---|---|---|---|---|"]
        c = _lists(table)
        for u in sort_order(table, self.sort_by):
            cls = c["top_class"][u]
            name = names[cls] if 0 <= cls < len(names) else (str(cls) if cls >= 0 else "")
            population = ", ".join(names[k] if k < len(names) else str(k) for k in table.population_classes[u])
            rows.append(f"| {u} | {name} | {_short(c['class_selectivity'][u])} | "
                        f"{_short(c['color_selectivity'][u])} | {_short(c['csi'][u])} | "
                        f"{population} | {'yes' if c['dead'][u] else ''} |")
        return "\n".join(rows)

    def csv_rows(self, epoch: int, names: Sequence[str]) -> list[dict]:
        """One row per unit of every layer of the last tables (columns `CSV_COLUMNS`)."""
        rows = []
        for layer, t in self.tables.items():
            c = _lists(t)
            for u in range(t.num_units):
                cls = c["top_class"][u]
                rows.append({
                    "epoch": epoch, "layer": layer, "unit": u,
                    "class_selectivity": _cell(c["class_selectivity"][u]),
                    "color_selectivity": _cell(c["color_selectivity"][u]), "csi": _cell(c["csi"][u]),
                    "top_class": cls if cls >= 0 else "",
                    "top_class_name": (names[cls] if cls < len(names) else str(cls)) if cls >= 0 else "",
                    "top_class_frequency": _cell(c["top_class_frequency"][u]) if cls >= 0 else "",
                    "population_code": c["population_code"][u],
                    "population_classes": ";".join(str(k) for k in t.population_classes[u]),
                    "dead": int(c["dead"][u]),
                    "top_activation": _cell(c["top_activation"][u]),
                    "top_images": c["top_images"][u]})
        return rows

    def csv_path(self, trainer: pl.Trainer) -> Path:
        return sink.log_dir(trainer) / self.name / "units.csv"

    def write_csv(self, trainer: pl.Trainer, epoch: int, names: Sequence[str]) -> None:
        """Rewrite units.csv atomically: the rows of earlier epochs kept, this epoch's (re)placed."""
        path = self.csv_path(trainer)
        kept = []
        if path.is_file():
            with path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f)
                        if row.get("epoch", "").isdigit() and int(row["epoch"]) < epoch]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows(self.csv_rows(epoch, names))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".units.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(out.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- the fit-end strip -----------------------------------------------------------------------
    def _remember(self, layer: str, epoch: int, table: UnitTable) -> None:
        if table.neuron_features is None:
            return
        tiles = nf_tiles(table)
        side = max(tiles.shape[-2:])
        if side > HISTORY_SIDE:
            h, w = tiles.shape[-2:]
            tiles = F.interpolate(tiles, size=(max(1, h * HISTORY_SIDE // side), max(1, w * HISTORY_SIDE // side)),
                                  mode="area")
        kept = [(e, t) for e, t in self.history.get(layer, []) if e < epoch]  # a resumed run replaces an epoch
        self.history[layer] = kept + [(epoch, (tiles * 255).round().to(torch.uint8))]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if trainer.is_global_zero and not self.declined and self.strip_units and self.tables and self.history:
            for layer, table in self.tables.items():
                strip = self.strip(layer, table)
                if strip is not None:
                    self.log_image(trainer, f"{self.name}_strip/{layer}", strip)

    def strip(self, layer: str, table: UnitTable) -> torch.Tensor | None:
        """[3, H, W]: the NFs of the `strip_units` most selective units (rows) over the epochs drawn
        (columns), or None without history for `layer`."""
        history = [(e, t) for e, t in self.history.get(layer, []) if t.shape[0] == table.num_units]
        if not history:
            return None
        units = [u for u in sort_order(table, self.sort_by) if not bool(table.dead[u])][:self.strip_units]
        if not units:
            return None
        tiles = torch.stack([t[u].float() / 255 for u in units for _, t in history])
        return captioned_grid(tiles, nrow=len(history), row_titles=[f"#{u}" for u in units],
                              col_titles=[f"e{e}" for e, _ in history], tile_size=self.tile_size)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["history"] = {layer: [(int(e), t) for e, t in items] for layer, items in self.history.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        history = state_dict.get("history")
        if isinstance(history, dict):
            self.history = {layer: [(int(e), t) for e, t in items] for layer, items in history.items()}
