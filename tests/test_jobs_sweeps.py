"""What a sweep gets back from a run and reads of a sweep (issue 25.4): the run returns its
`optimized_metric` (a 3-trial hydra-optuna-sweeper search on the shapes demo; one line for a metric
the run never logs); the summary's grid axes come from the sweep's own config, its test image from
the datamodule's test dataloader, and its PNG files are the TensorBoard images."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict, read_write

from conftest import FAST_SHAPES, ROOT, compose_cfg
from convlens import jobs, run_status, sweep_summary

TINY = FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
                      "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1"]


# --------------------------------------------------------------------------------------------
# optimized_metric
# --------------------------------------------------------------------------------------------

def test_a_run_returns_its_optimized_metric(tmp_path):
    from convlens.train import run_job

    value = run_job(compose_cfg(TINY + ["optimized_metric=val/loss"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == metrics["val/loss"] and value != metrics["val/acc_best"]
    # a finished sweep job that is skipped returns it from its metrics.json
    skip = compose_cfg(TINY + ["optimized_metric=test/acc", "+skip_finished=true"], tmp_path)
    assert run_job(skip, multirun=True) == metrics["test/acc"]
    # the default: the best validation accuracy
    assert compose_cfg([], tmp_path).optimized_metric == "val/acc_best"

    # a metric the run never logged: one line naming it and the ones it did; the results are kept
    wrong = compose_cfg(TINY + ["optimized_metric=val/accuracy", "+skip_finished=true"], tmp_path)
    with pytest.raises(jobs.OptimizedMetricError) as e:
        run_job(wrong, multirun=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("optimized_metric=val/accuracy is not a metric")
    assert f"it logged: {', '.join(sorted(metrics))}." in message
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_a_fresh_run_with_an_unlogged_metric_keeps_its_results(tmp_path):
    from convlens.train import run_job

    with pytest.raises(jobs.OptimizedMetricError, match="optimized_metric=val/nope"):
        run_job(compose_cfg(TINY + ["optimized_metric=val/nope", "test=false"], tmp_path))
    assert run_status.read_status(tmp_path)["status"] == "finished"
    assert "val/acc_best" in json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
def test_optuna_search_minimizes_the_optimized_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    base = ["-m", "experiment=shapes_demo", "debug=limit", "callbacks=none", "datamodule.n_train=64",
            "datamodule.val_size=16", "datamodule.n_test=16", "datamodule.batch_size=16", "hydra/sweeper=optuna",
            "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0"]

    def cli(*args):
        return subprocess.run([sys.executable, "train.py", *base, *args], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=400)

    # the README's command, 3 trials
    sweep = tmp_path / "optuna"
    r = cli("optimized_metric=val/loss", "hydra.sweeper.direction=minimize", "model.optimizer.lr=interval(0.001,0.1)",
            "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    trials = {}
    for metrics_file in sweep.glob("*/metrics.json"):
        (lr,) = [float(o.split("=", 1)[1]) for o in OmegaConf.load(metrics_file.parent / ".hydra" / "overrides.yaml")
                 if o.startswith("model.optimizer.lr=")]
        trials[lr] = json.loads(metrics_file.read_text())["val/loss"]
    assert len(trials) == 3 and all(0.001 <= lr <= 0.1 for lr in trials)
    # oracle: the jobs' own metrics.json; optuna's best is the smallest val/loss and its lr
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    best_lr = min(trials, key=trials.get)
    assert result.best_value == pytest.approx(trials[best_lr])
    assert result.best_params["model.optimizer.lr"] == pytest.approx(best_lr)
    # optuna writes no multirun.yaml: the summary's axis is the key the jobs differ in
    summary = sweep_summary.summarize(sweep, panels=False)
    rows = list(csv.DictReader(summary.files["csv"].open()))
    assert sorted(float(row["lr"]) for row in rows) == sorted(trials) and {row["status"] for row in rows} == {
        "finished"}

    # a metric the run never logs: one line, naming it and what was logged
    r = cli("optimized_metric=val/nope", "model.optimizer.lr=interval(0.001,0.1)", "hydra.sweeper.n_trials=1",
            f"hydra.sweep.dir={tmp_path / 'nope'}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("convlens: OptimizedMetricError: optimized_metric=val/nope is not a metric")
    assert "val/loss" in lines[-1] and "val/acc_best" in lines[-1]


# --------------------------------------------------------------------------------------------
# the sweep's axes, from the sweep's own config
# --------------------------------------------------------------------------------------------

def write_multirun_yaml(sweep: Path, cfg, task_overrides) -> None:
    """What Hydra's basic sweeper saves as `<sweep dir>/multirun.yaml`: the config, the command
    line's overrides in `hydra.overrides.task`."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = list(task_overrides)
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, sweep / "multirun.yaml")


def test_grid_axes_are_the_swept_keys_of_the_grid(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_grid"], tmp_path)
    sweep = tmp_path / "sweep"
    write_multirun_yaml(sweep, cfg, ["experiment=cifar10_grid"])
    assert sweep_summary.sweep_axes(sweep) == ["model.c3", "model.c4"]  # as the grid's config lists them
    # a command line that fixes one (one column) or reorders them keeps the grid; bookkeeping is no axis
    write_multirun_yaml(sweep, cfg, ["experiment=cifar10_grid", "model.c4=4,8", "model.c3=8",
                                     "skip_finished=false,true", "hydra.launcher.n_jobs=1,2"])
    assert sweep_summary.grid_axes(sweep) == ("model.c3", "model.c4")
    assert sweep_summary.grid_axes(sweep, rows="model.c4") == ("model.c4", "model.c3")


def test_axes_of_a_sweep_without_params_are_its_swept_command_line_keys(tmp_path):
    cfg = compose_cfg(["experiment=shapes_demo"], tmp_path)
    sweep = tmp_path / "sweep"
    write_multirun_yaml(sweep, cfg, ["experiment=shapes_demo", "trainer.max_epochs=1", "seed=1,2",
                                     "model.optimizer.lr=interval(0.001,0.1)"])
    assert sweep_summary.sweep_axes(sweep) == ["seed", "model.optimizer.lr"]


def fake_job(sweep: Path, name: str, overrides, config: dict, metrics: dict | None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_axes_without_a_sweep_config_are_the_keys_the_jobs_differ_in(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (model, lr) in enumerate([("lenet", 0.1), ("lenet", 0.01), ("blog_convnet", 0.1)]):
        fake_job(sweep, f"job{i}", ["trainer.max_epochs=1", f"model={model}", f"model.optimizer.lr={lr}",
                                    f"optimized_metric=val/loss{i}"],
                 {"model": {"name": model, "optimizer": {"lr": lr}}},
                 {"params": 100 + i, "test/acc": 0.5 + i / 10, "val/acc_best": 0.4})
    assert sweep_summary.sweep_axes(sweep) == ["model", "model.optimizer.lr"]
    by_name = {j.name: j for j in sweep_summary.collect(sweep)}
    # a config group's value is the option its overrides chose
    assert [(by_name[f"job{i}"].row, by_name[f"job{i}"].col) for i in range(3)] == \
        [("lenet", 0.1), ("lenet", 0.01), ("blog_convnet", 0.1)]


def test_tables_with_one_axis_and_with_none(tmp_path):
    one = [sweep_summary.JobResult(name="a", dir=tmp_path, config=None, row=0.1, status="finished",
                                   metrics={"params": 10, "test/acc": 0.5})]
    sweep_summary.write_csv(one, tmp_path / "one.csv", rows="model.optimizer.lr")
    assert list(csv.reader((tmp_path / "one.csv").open()))[:2] == [
        ["run", "lr", *sweep_summary.CSV_COLUMNS], ["a", "0.1", "10", "", "0.5000", "", "", "finished", ""]]
    table = sweep_summary.markdown_table(one).splitlines()
    assert table[0].startswith("| run | params |") and table[2].startswith("| a | 10 |")
    assert table[1].count("|") == table[0].count("|")


# --------------------------------------------------------------------------------------------
# the test image, through the datamodule's test dataloader
# --------------------------------------------------------------------------------------------

def test_test_image_is_read_through_the_test_dataloader(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=shapes_demo", "datamodule.n_test=300", "datamodule.batch_size=16"], tmp_path)
    # oracle: the datamodule's stored split, normalized by hand
    dm = instantiate(cfg.datamodule)
    dm.setup("test")
    index = 260  # in the second test batch (256 a batch)
    raw, label = dm.test_set.images[index:index + 1], int(dm.test_set.labels[index])
    image, pixels, name = sweep_summary.test_image(cfg, index)
    assert np.array_equal(image.numpy(), dm.normalization(raw).numpy())
    assert np.array_equal(pixels.numpy(), (raw.float() / 255).numpy())
    assert name == dm.class_names[label]
    for bad, why in ((300, "the test split has 300 images (0..299)"), (-1, "counts from 0")):
        with pytest.raises(ValueError, match=fr"image_index={bad} is out of range: .*{why.split('(')[0]}"):
            sweep_summary.test_image(cfg, bad)


# --------------------------------------------------------------------------------------------
# the summary's images: one encoding, in the file and in TensorBoard
# --------------------------------------------------------------------------------------------

def test_summary_pngs_are_the_tensorboard_images(tmp_path):
    from PIL import Image

    from convlens.events import read_images

    sweep = tmp_path / "sweep"
    for i, c4 in enumerate((4, 8)):
        fake_job(sweep, f"c4={c4}", [f"model.c4={c4}"], {"model": {"c4": c4}},
                 {"params": 1000 * (i + 1), "test/acc": 0.5 + 0.1 * i, "val/acc_best": 0.5})
    result = sweep_summary.summarize(sweep, panels=False)
    png = result.files["plot"].read_bytes()
    ((step, logged),) = read_images(result.files["tensorboard"])["sweep/test_acc_vs_params"]
    assert step == 0 and logged == png
    # oracle: PIL's decoder, against the plot drawn again from the same jobs
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(decoded, sweep_summary.accuracy_plot(result.jobs, "model.c4"))
    assert [j.row for j in result.jobs] == [4, 8]  # the axis the jobs differ in
