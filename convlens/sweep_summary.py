"""The sweep summary of a Hydra multirun (`convlens-train -m ...`): tables, Fig. 6 and Figs. 7-8.

Follows Berthier & Mantoux, "Visualizing and Understanding Convolutional Neural Networks"
(RecVis 2018 report), section 3.4 and Figs. 6-8: a grid search over the filters of conv3 x conv4,
compared by test accuracy against parameter count (Fig. 6) and by the deconvnet projection of each
model's most activated conv3 (Fig. 7) and conv4 (Fig. 8) map on one fixed test image, laid out on
the C3 x C4 grid. Training does not import this module; the job bookkeeping it reads
(`status.json`, `metrics.json`, refused jobs) is `convlens.run_status` and `convlens.run_guard`.

The grid's axes (`rows`, `cols`) are config keys; by default the keys the sweep varies, read from
the sweep's own config (`sweep_axes`): for the CIFAR grid `model.c3` and `model.c4`.

The summary (`summarize(sweep_dir)`; run by the Hydra callback `SweepSummary` when a multirun ends,
or `convlens-sweep-summary <sweep_dir>` for an existing sweep) writes into the sweep dir:
- `summary.csv`, `summary.md`: one row per job (grid axes, params, best val acc, test acc, seconds
  per epoch, epochs, status, error), accuracies as fractions in the CSV, percent in the markdown;
  where the jobs ran the `faithfulness` callback, each model's last faithfulness scores too (CSV
  columns `faithfulness/<method>/<score>`, a markdown table of deletion / insertion AUC);
- `test_acc_vs_params.png`: test accuracy against parameters (Fig. 6), one line per row value;
- `deconv_<layer>.png`: for one fixed test image (`image_index` into the test split of the first
  finished job's datamodule, read through its test dataloader), each model's map of `layer` with
  the highest maximum activation (the report's ranking), projected to pixel space by
  `viz.deconvnet` (biases ignored, unpooling by switches), each projection min-max scaled on its
  own; tiles on the rows x cols grid (captions: map index, test accuracy); a missing model is a
  gray tile captioned with its status;
- `summary/`: a TensorBoard run with the plot and the panels as images (`sweep/...`, the same PNG
  bytes as the files, encoded as the callbacks' images are: `convlens.events.image_summary`) and the
  table as text, so `tensorboard --logdir <sweep_dir>` shows it beside the jobs' runs.
Each model is rebuilt from its job's `.hydra/config.yaml` (hydra.utils.instantiate) with the
weights of its best checkpoint in `<job dir>/checkpoints/` (`last.ckpt` if there is no other),
read with `torch.load(weights_only=True)` (`convlens.checkpoints`).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from convlens.callbacks.faithfulness import final_scores, scores_markdown
from convlens.checkpoints import load_file, load_state_checked, pick_checkpoint
from convlens.errors import ConvlensError
from convlens.files import atomic_write
from convlens.run_guard import BOOKKEEPING_KEYS, hydra_dir, read_refused
from convlens.run_status import METRICS_FILE, read_status

log = logging.getLogger("convlens.sweep")


class SweepError(ConvlensError, ValueError):
    """A sweep dir that does not exist or holds no job."""

# ----------------------------------------------------------------------------------------------
# Collecting the jobs of a sweep
# ----------------------------------------------------------------------------------------------

@dataclass
class JobResult:
    """One job of a sweep: where it is, its grid coordinates and what it produced."""
    name: str                       # its folder, relative to the sweep dir (also its TensorBoard run)
    dir: Path
    config: DictConfig | None
    row: Any = None                 # value of the grid's row key (e.g. model.c3)
    col: Any = None                 # value of the grid's column key (e.g. model.c4)
    status: str = "incomplete"      # finished | failed | incomplete (interrupted or still running) | refused
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> int | None:
        p = self.metrics.get("params")
        return int(p) if p is not None else None

    @property
    def val_acc(self) -> float | None:
        return self.metrics.get("val/acc_best")

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test/acc")


def _select(cfg: DictConfig | None, key: str | None) -> Any:
    if cfg is None or key is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # an interpolation that needs Hydra's runtime
        return None


def _parse(overrides: Sequence[str]) -> list:
    """Hydra's parsed overrides, those that do not parse left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, parsed = OverridesParser.create(), []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except Exception:
            continue
    return parsed


def _is_axis(key: str) -> bool:
    return key.split(".")[0] != "hydra" and "/" not in key and key not in BOOKKEEPING_KEYS


def _job_overrides(job_dir: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    except Exception:
        return []


def sweep_axes(sweep_dir: str | os.PathLike) -> list[str]:
    """The config keys the sweep in `sweep_dir` varies, in the order its sweeper takes them. From the
    sweep's own config (`multirun.yaml`, which Hydra's basic sweeper writes): each key of
    `hydra.sweeper.params` and of the command line's overrides that either of them sweeps (so
    `experiment=cifar10_grid model.c4=32` keeps C4 as an axis of one column). Without one (another
    sweeper, e.g. optuna's): the keys whose values differ between the jobs' `.hydra/overrides.yaml`.
    Hydra's own keys and the bookkeeping ones (`skip_finished`, ...) are no axes."""
    sweep_dir = Path(sweep_dir)
    try:
        config = OmegaConf.load(sweep_dir / "multirun.yaml")
    except Exception:
        config = None
    if config is not None:
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        lines = [f"{k}={v}" for k, v in params.items()]
        lines += [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
        swept = {o.key_or_group for o in _parse(lines) if o.is_sweep_override()}
        return [k for k in dict.fromkeys(o.key_or_group for o in _parse(lines)) if k in swept and _is_axis(k)]
    values: dict[str, set[str]] = {}
    jobs = [_job_overrides(f.parent.parent) for f in sorted(sweep_dir.rglob(".hydra/overrides.yaml"))]
    for overrides in jobs:
        for o in _parse(overrides):
            values.setdefault(o.key_or_group, set()).add(str(o.value()))
    for overrides in jobs:  # a key some jobs lack varies too
        for key in set(values) - {o.key_or_group for o in _parse(overrides)}:
            values[key].add("")
    return [k for k, v in values.items() if len(v) > 1 and _is_axis(k)]


def grid_axes(sweep_dir: str | os.PathLike, rows: str | None = None,
              cols: str | None = None) -> tuple[str | None, str | None]:
    """(rows, cols): the given keys, or else the sweep's first two axes (`sweep_axes`); None where
    the sweep varies fewer keys."""
    if rows is None or cols is None:
        axes = [a for a in sweep_axes(sweep_dir) if a not in (rows, cols)]
        rows = rows if rows is not None else (axes.pop(0) if axes else None)
        cols = cols if cols is not None else (axes.pop(0) if axes else None)
    return rows, cols


def _axis_value(cfg: DictConfig | None, overrides: Sequence[str], key: str | None) -> Any:
    """A job's value of an axis: from its config, or, for a config group (`model=...`, a whole
    node in the config), the option its overrides chose."""
    value = _select(cfg, key)
    if isinstance(value, (DictConfig, ListConfig)):
        chosen = [str(o.value()) for o in _parse(overrides) if o.key_or_group == key]
        return chosen[-1] if chosen else None
    return value


def collect(sweep_dir: str | os.PathLike, rows: str | None = None, cols: str | None = None) -> list[JobResult]:
    """Every job of the sweep (each folder under `sweep_dir` with a `.hydra/config.yaml`), sorted by
    (row, col) value, then name; `rows`, `cols`: the grid's keys (default: `grid_axes`)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"Sweep dir {sweep_dir} does not exist; pass the hydra.sweep.dir of a multirun")
    rows, cols = grid_axes(sweep_dir, rows, cols)
    jobs = []
    for cfg_file in sorted(sweep_dir.rglob(".hydra/config.yaml")):
        job_dir = cfg_file.parent.parent
        try:
            cfg = OmegaConf.load(cfg_file)
        except Exception as e:  # unreadable config: still list the job
            log.warning("Cannot read %s: %s", cfg_file, e)
            cfg = None
        overrides = _job_overrides(job_dir)
        job = JobResult(name=job_dir.relative_to(sweep_dir).as_posix(), dir=job_dir, config=cfg,
                        row=_axis_value(cfg, overrides, rows), col=_axis_value(cfg, overrides, cols))
        status = read_status(job_dir) or {}
        metrics_file = job_dir / METRICS_FILE
        if metrics_file.is_file():
            job.status, job.metrics = "finished", json.loads(metrics_file.read_text())
        elif status.get("status") == "failed":
            job.status, job.error = "failed", status.get("error")
        elif status.get("status") == "interrupted":
            job.status = "incomplete"
            job.error = f"{status.get('error') or 'interrupted'} (resumed from its last.ckpt when the sweep is rerun)"
        else:
            job.status = "incomplete"
            job.error = "no metrics.json: interrupted, or still running"
        jobs.append(job)
    for record in read_refused(sweep_dir):  # refused jobs (a folder clash) have no folder of their own
        try:
            cfg = OmegaConf.create(record.get("config") or {})
        except Exception:
            cfg = None
        overrides = record.get("overrides") or []
        jobs.append(JobResult(name=record.get("name") or " ".join(overrides) or "refused job",
                              dir=Path(record.get("dir") or sweep_dir), config=cfg,
                              row=_axis_value(cfg, overrides, rows), col=_axis_value(cfg, overrides, cols),
                              status="refused", error=record.get("error")))
    if not jobs:
        raise SweepError(f"No job found under {sweep_dir} (no */.hydra/config.yaml); is it a multirun's sweep dir?")

    def key(j: JobResult):
        return (j.row is None, j.row if isinstance(j.row, (int, float)) else 0, str(j.row),
                j.col is None, j.col if isinstance(j.col, (int, float)) else 0, str(j.col), j.name)
    return sorted(jobs, key=key)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _axis_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _axes(job: JobResult | None, rows: str | None, cols: str | None) -> list[tuple[str, Any]]:
    """[(axis key, the job's value)] of the grid's axes that are set."""
    return [(k, v) for k, v in ((rows, job.row if job else None), (cols, job.col if job else None)) if k]


CSV_COLUMNS = ("params", "val_acc_best", "test_acc", "seconds_per_epoch", "epochs", "status", "error")


def write_csv(jobs: Sequence[JobResult], path: Path, rows: str | None = None, cols: str | None = None) -> None:
    # then the Faithfulness callback's last scores (`faithfulness/<method>/<score>`), where jobs logged them
    extra = sorted({k for j in jobs for k in j.metrics if k.startswith("faithfulness/")})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *(_axis_name(k) for k, _ in _axes(None, rows, cols)), *CSV_COLUMNS, *extra])
        for j in jobs:
            m = j.metrics
            w.writerow([j.name, *(v for _, v in _axes(j, rows, cols)), j.params if j.params is not None else "",
                        _fmt(j.val_acc, "{:.4f}"), _fmt(j.test_acc, "{:.4f}"),
                        _fmt(m.get("seconds_per_epoch"), "{:.2f}"), _fmt(m.get("epochs"), "{:.0f}"),
                        j.status, (j.error or "").replace("\n", " "), *(_fmt(m.get(k), "{:.4f}") for k in extra)])


def _fmt(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def markdown_table(jobs: Sequence[JobResult], rows: str | None = None, cols: str | None = None) -> str:
    """One row per job: its grid values (its name where it has no row value, or the sweep no axis)."""
    names = [_axis_name(k) for k, _ in _axes(None, rows, cols)] or ["run"]
    head = f"| {' | '.join(names)} | params | best val acc | test acc | s/epoch | epochs | status |"
    lines = [head, "|" + "---:|" * (len(names) + 5) + "---|"]
    for j in jobs:
        m = j.metrics
        pct = lambda v: _fmt(None if v is None else 100 * v, "{:.1f}%")  # noqa: E731
        cells = [v for _, v in _axes(j, rows, cols)] or [None]
        cells = [j.name if cells[0] is None else cells[0]] + ["" if v is None else v for v in cells[1:]]
        lines.append(f"| {' | '.join(str(c) for c in cells)} "
                     f"| {_fmt(j.params, '{:,}')} | {pct(j.val_acc)} | {pct(j.test_acc)} "
                     f"| {_fmt(m.get('seconds_per_epoch'), '{:.1f}')} | {_fmt(m.get('epochs'), '{:.0f}')} "
                     f"| {j.status} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Fig. 6: test accuracy against parameters
# ----------------------------------------------------------------------------------------------

def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def accuracy_plot(jobs: Sequence[JobResult], rows: str | None = None, cols: str | None = None):
    """Test accuracy (%) against parameters (thousands) of the finished jobs: one line per row value
    (e.g. one per C3, through its C4 values), each point labelled with its column value. Returns an
    RGB uint8 array [H, W, 3]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [j for j in jobs if j.params is not None and j.test_acc is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    groups: dict[Any, list[JobResult]] = {}
    for j in done:
        groups.setdefault(j.row, []).append(j)
    for row, members in groups.items():
        members = sorted(members, key=lambda j: j.params)
        x = [j.params / 1e3 for j in members]
        y = [100 * j.test_acc for j in members]
        label = f"{_axis_name(rows)}={_short(row)}" if row is not None else "runs"
        ax.plot(x, y, "o-", label=label)
        for j, xi, yi in zip(members, x, y):
            # each point by its column value; by its name only where the sweep has no axis at all
            text = f"{_axis_name(cols)}={_short(j.col)}" if j.col is not None else "" if row is not None else j.name
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not done:
        ax.text(0.5, 0.5, "no finished job", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against parameters (Fig. 6)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


# ----------------------------------------------------------------------------------------------
# Figs. 7-8: the most activated map of each model, projected, on the grid
# ----------------------------------------------------------------------------------------------

def load_net(job: JobResult):
    """The job's network (`module.net`) rebuilt from its config, with its checkpoint's weights, in
    eval mode, on the CPU."""
    from hydra.utils import instantiate

    if job.config is None:
        raise FileNotFoundError(f"no readable config in {job.dir / '.hydra'}")
    module = instantiate(job.config.model)
    path = pick_checkpoint(job.dir / "checkpoints")
    load_state_checked(module, load_file(path, "checkpoint")["state_dict"], str(path))
    return getattr(module, "net", module).eval()


def test_image(config: DictConfig, index: int):
    """(image [1, C, H, W] in model input space, pixels [1, C, H, W] in [0, 1], class name) of
    test image `index`, from the job's datamodule through Lightning's interface: `setup("test")`,
    its test dataloader's batches (images, labels), then `on_after_batch_transfer` (where convlens'
    datamodules normalize) as in a test step."""
    from hydra.utils import instantiate

    from convlens.render import to_pixels

    if index < 0:
        raise ValueError(f"image_index={index} is out of range: it counts from 0")
    dm = instantiate(config.datamodule)
    dm.setup("test")
    seen = 0
    for images, labels, *_ in dm.test_dataloader():
        if index < seen + len(labels):
            i = index - seen
            raw, label = images[i:i + 1], labels[i:i + 1]
            break
        seen += len(labels)
    else:
        raise ValueError(f"image_index={index} is out of range: the test split has {seen} images (0..{seen - 1})")
    image = dm.on_after_batch_transfer((raw, label), 0)[0]
    # the pixels: the stored 8-bit image, or else the model input with the datamodule's normalization undone
    pixels = raw.float() / 255 if raw.dtype == torch.uint8 else to_pixels(image, getattr(dm, "normalization", None))
    names = list(getattr(dm, "class_names", ()) or ())
    label = int(label[0])
    return image, pixels, names[label] if label < len(names) else str(label)


def most_activated_projection(net, image, layer: str, unpool: str = "switches"):
    """(projection [C, H, W], map index) for one image [1, C, H, W]: the map of `layer` with the
    highest maximum activation (the report's ranking), projected to pixel space by the deconvnet."""
    from convlens.viz.deconvnet import record

    rec = record(net, image, layer)
    _, top = rec.top_units(1)
    return rec.project(top[:, 0], unpool)[0], int(top[0, 0])


def _text_image(text: str, width: int):
    import numpy as np
    from PIL import Image, ImageDraw

    from convlens.render import caption_font

    canvas = Image.new("RGB", (max(width, 6 * len(text) + 4), 14), "white")
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black", font=caption_font())
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def deconv_panels(jobs: Sequence[JobResult], layers: Sequence[str] = ("conv3", "conv4"),
                  image_index: int = 0, rows: str | None = None, cols: str | None = None,
                  tile_size: int = 96, unpool: str = "switches"):
    """{layer: [3, H, W] image in [0, 1]} (Figs. 7-8) and a list of notes on what could not be
    drawn. Each panel: the test image, then one tile per job on the rows x cols grid (one row of
    all jobs when a job lacks a grid value)."""
    from convlens.render import captioned_grid, scale_each, stack_vertical

    notes: list[str] = []
    jobs = [j for j in jobs if j.status != "refused"]  # no model and no cell of their own on the grid
    finished = [j for j in jobs if j.status == "finished"]
    if not finished or not layers:
        return {}, ["no finished job: no panels" if layers else "no layers asked for"]
    try:
        image, pixels, class_name = test_image(finished[0].config, image_index)
    except Exception as e:  # data missing on this machine, a datamodule without a test split, ...
        return {}, [f"panels skipped: cannot load test image {image_index}: {type(e).__name__}: {e}"]

    # cells[job.name][layer] = (projection [C, H, W], map index) or the reason there is none
    cells: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job.status != "finished":
            cells[job.name] = {layer: job.status for layer in layers}
            continue
        try:
            net = load_net(job)
        except Exception as e:
            notes.append(f"{job.name}: cannot load the model: {type(e).__name__}: {e}")
            cells[job.name] = {layer: "no model" for layer in layers}
            continue
        cells[job.name] = {}
        for layer in layers:
            try:
                cells[job.name][layer] = most_activated_projection(net, image, layer, unpool)
            except ValueError as e:  # LayerError, DeconvnetError: this net has no such layer
                notes.append(f"{job.name}: no projection of {layer}: {e}")
                cells[job.name][layer] = f"no {layer}"

    grid_shape = all(j.row is not None and j.col is not None for j in jobs)
    if grid_shape:
        row_values = sorted({j.row for j in jobs}, key=lambda v: (str(type(v)), v))
        col_values = sorted({j.col for j in jobs}, key=lambda v: (str(type(v)), v))
        by_cell = {(j.row, j.col): j for j in jobs}
        layout = [by_cell.get((r, c)) for r in row_values for c in col_values]
        nrow = len(col_values)
        row_titles = [f"{_axis_name(rows)}={v}" for v in row_values]
        col_titles = [f"{_axis_name(cols)}={v}" for v in col_values]
    else:
        layout, nrow, row_titles, col_titles = list(jobs), len(jobs), None, None

    blank = torch.full(tuple(image.shape[1:]), 0.85)
    panels = {}
    for layer in layers:
        tiles, captions = [], []
        for job in layout:
            cell = cells[job.name][layer] if job is not None else "not run"
            if isinstance(cell, tuple):
                projection, channel = cell
                tiles.append(scale_each(projection[None])[0])
                acc = f", {100 * job.test_acc:.1f}%" if job.test_acc is not None else ""
                captions.append(f"map {channel}{acc}")
            else:
                tiles.append(blank)
                captions.append(str(cell))
            if not grid_shape:  # no grid titles: name the run instead (as many letters as fit)
                captions[-1] = job.name[: max(tile_size // 6 - 1, 4)]
        grid = captioned_grid(torch.stack(tiles), nrow=nrow, captions=captions, row_titles=row_titles,
                              col_titles=col_titles, tile_size=tile_size)
        header = captioned_grid(pixels, nrow=1, captions=[f"test #{image_index}: {class_name}"],
                                tile_size=tile_size)
        title = _text_image(f"{layer}: most activated map of each model, deconvnet projection", grid.shape[-1])
        panels[layer] = stack_vertical([title, header, grid], gap=4)
    return panels, notes


# ----------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------

@dataclass
class Summary:
    jobs: list[JobResult]
    files: dict[str, Path]
    notes: list[str]


def _write_png(path: Path, summary) -> None:
    atomic_write(path, lambda f: f.write(summary.value[0].image.encoded_image_string))


def summarize(sweep_dir: str | os.PathLike, layers: Sequence[str] = ("conv3", "conv4"),
              image_index: int = 0, rows: str | None = None, cols: str | None = None,
              tile_size: int = 96, unpool: str = "switches", panels: bool = True) -> Summary:
    """Write the summary files of the sweep in `sweep_dir` (see the module docstring); `rows`,
    `cols`: the grid's keys (default: the sweep's axes, `grid_axes`)."""
    from torch.utils.tensorboard import SummaryWriter

    from convlens.events import image_summary

    sweep_dir = Path(sweep_dir)
    rows, cols = grid_axes(sweep_dir, rows, cols)
    jobs = collect(sweep_dir, rows, cols)
    faithfulness = {j.name: final_scores(j.dir) for j in jobs if j.status == "finished"}  # {} without the callback
    for j in jobs:
        j.metrics.update({f"faithfulness/{k}": v for k, v in faithfulness.get(j.name, {}).items()})
    files = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md",
             "plot": sweep_dir / "test_acc_vs_params.png", "tensorboard": sweep_dir / "summary"}
    write_csv(jobs, files["csv"], rows, cols)

    # each image encoded once, by the callbacks' encoder: the PNG file is the TensorBoard image
    plot = accuracy_plot(jobs, rows, cols)
    images = {"sweep/test_acc_vs_params": image_summary("sweep/test_acc_vs_params",
                                                        torch.from_numpy(plot).permute(2, 0, 1).float() / 255)}
    _write_png(files["plot"], images["sweep/test_acc_vs_params"])
    notes: list[str] = []
    if panels:
        drawn, notes = deconv_panels(jobs, layers, image_index, rows, cols, tile_size, unpool)
        for layer, panel in drawn.items():
            files[f"deconv_{layer}"] = sweep_dir / f"deconv_{layer}.png"
            images[f"sweep/deconv_{layer}"] = image_summary(f"sweep/deconv_{layer}", panel.clamp(0, 1))
            _write_png(files[f"deconv_{layer}"], images[f"sweep/deconv_{layer}"])

    table = markdown_table(jobs, rows, cols)
    counts = {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "incomplete", "refused")}
    md = [f"# Sweep summary: {sweep_dir.name}", "",
          f"{len(jobs)} jobs: {counts['finished']} finished, {counts['failed']} failed, "
          f"{counts['incomplete']} incomplete" + (f", {counts['refused']} refused." if counts["refused"] else ".")]
    scored = [j for j in jobs if j.test_acc is not None]
    if scored:
        best = max(scored, key=lambda j: j.test_acc)
        md.append(f"Best test accuracy: {100 * best.test_acc:.1f}% ({best.name}, "
                  f"{_fmt(best.params, '{:,}')} parameters).")
    md += ["", table, ""]
    if scores_markdown(faithfulness):
        md += ["## Faithfulness of each model's explanations, last epoch (deletion AUC, lower is more faithful / "
               "insertion AUC, higher is more faithful)", "", scores_markdown(faithfulness), ""]
    problems = [j for j in jobs if j.status != "finished"]
    if problems:
        md += ["## Not finished (failed jobs are retried and interrupted ones resumed when the sweep is "
               "run again; refused ones need another hydra.sweep.subdir or sweep dir)", ""]
        md += [f"- `{j.name}`: {j.status}: {' '.join((j.error or '').split())}" for j in problems] + [""]
    md += ["## Test accuracy against parameters (Fig. 6)", "", f"![]({files['plot'].name})", ""]
    for layer in layers:
        if f"deconv_{layer}" in files:
            md += [f"## Most activated {layer} map of each model (test image {image_index})", "",
                   f"![]({files[f'deconv_{layer}'].name})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    files["md"].write_text("\n".join(md))

    # the summary run is regenerated: drop the events of an earlier summary of this sweep
    files["tensorboard"].mkdir(exist_ok=True)
    for f in files["tensorboard"].glob("events.out.tfevents.*"):
        f.unlink()
    writer = SummaryWriter(log_dir=str(files["tensorboard"]))
    try:
        for summary in images.values():
            writer._get_file_writer().add_summary(summary, 0)
        writer.add_text("sweep/summary", table, global_step=0)
    finally:
        writer.close()
    for note in notes:
        log.warning(note)
    log.info("Sweep summary of %s (%d jobs):\n%s", sweep_dir, len(jobs), table)
    return Summary(jobs=jobs, files=files, notes=notes)


class SweepSummary(Callback):
    """Hydra callback (`hydra.callbacks`): writes the sweep summary when the multirun ends. A
    failure here is logged with the command to redo it, and does not fail the finished sweep."""

    def __init__(self, layers: Sequence[str] = ("conv3", "conv4"), image_index: int = 0,
                 rows: str | None = None, cols: str | None = None, tile_size: int = 96,
                 unpool: str = "switches", panels: bool = True):
        self.kwargs = dict(layers=list(layers), image_index=image_index, rows=rows, cols=cols,
                           tile_size=tile_size, unpool=unpool, panels=panels)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = hydra_dir(config, "hydra.sweep.dir")
        try:
            result = summarize(sweep_dir, **self.kwargs)
        except Exception:
            log.exception("The sweep summary failed; redo it with: convlens-sweep-summary %s", sweep_dir)
            return
        print(f"Sweep summary: {result.files['md']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Summarize a Hydra multirun of train.py: summary.csv/.md, test accuracy against "
                    "parameters, and the deconvnet panels of each model's most activated maps.")
    parser.add_argument("sweep_dir", help="the sweep's hydra.sweep.dir")
    parser.add_argument("--layers", nargs="*", default=["conv3", "conv4"], help="layers of the panels")
    parser.add_argument("--image-index", type=int, default=0, help="the fixed test image (test split index)")
    parser.add_argument("--rows", default=None, help="config key of the grid's rows (default: the key the "
                        "sweep varies first, e.g. model.c3)")
    parser.add_argument("--cols", default=None, help="config key of the grid's columns (default: the key "
                        "the sweep varies next, e.g. model.c4)")
    parser.add_argument("--tile-size", type=int, default=96)
    parser.add_argument("--unpool", default="switches", choices=["switches", "fill"])
    parser.add_argument("--no-panels", action="store_true", help="skip the deconvnet panels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = summarize(args.sweep_dir, layers=args.layers, image_index=args.image_index, rows=args.rows,
                           cols=args.cols, tile_size=args.tile_size, unpool=args.unpool,
                           panels=not args.no_panels)
    except SweepError as e:
        print(f"convlens-sweep-summary: {e}", file=sys.stderr)
        return 1
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
