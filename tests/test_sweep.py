"""The grid-search sweep (experiment=cifar10_grid): its config, the job bookkeeping of
`train.run_job` (skip finished, record failures, retry), and a real 2x2 multirun of `train.py`
in a subprocess with its summary, HParams and panels."""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate

from convlens import checkpoints, jobs, sweep_summary
from conftest import ROOT, compose_cfg

C3, C4 = (64, 128, 256), (32, 64, 128, 256)


def grid_net_params(c3: int, c4: int, hidden: int = 1024, classes: int = 10) -> int:
    """Parameters of CifarConvNet(c3, c4) on 32x32 RGB, counted by hand: conv1 3->32 3x3, conv2
    32->64 3x3, BatchNorm(64), conv3 64->c3 3x3, conv4 c3->c4 3x3 (maps 2x2 after three pools:
    32 -> 15 -> 6 -> 2), fc1 c4*2*2 -> hidden, fc2 hidden -> classes; weights plus biases."""
    return ((3 * 9 + 1) * 32 + (32 * 9 + 1) * 64 + 2 * 64 + (64 * 9 + 1) * c3 + (c3 * 9 + 1) * c4
            + (c4 * 4 + 1) * hidden + (hidden + 1) * classes)


def sweep_jobs(cfg, cli=()):
    """The jobs' override lists, as Hydra's BasicSweeper makes them: `hydra.sweeper.params` first,
    then the command line (a CLI value replaces the config's for the same key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()] + list(cli)
    parsed = OverridesParser.create().parse_overrides(params)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def test_grid_experiment_is_the_reports_3x4_grid(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_grid"], tmp_path)
    jobs = sweep_jobs(cfg)
    assert len(jobs) == 12
    assert {tuple(j) for j in jobs} == {(f"model.c3={a}", f"model.c4={b}") for a, b in itertools.product(C3, C4)}
    # the report's recipe, every job with the visualization callbacks and the summary callback
    assert cfg.datamodule._target_.endswith("CIFAR10DataModule") and cfg.datamodule.batch_size == 64
    assert cfg.trainer.max_epochs == 40 and cfg.model.optimizer.lr == pytest.approx(1e-4)
    assert get_class(cfg.model.optimizer._target_) is torch.optim.Adam
    assert cfg.hydra.runtime.choices.callbacks == "default" and "model_checkpoint" in cfg.callbacks
    assert cfg.skip_finished is True
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_summary), sweep_summary.SweepSummary)


def test_grid_axes_are_overridable_from_the_command_line(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_grid"], tmp_path)
    jobs = sweep_jobs(cfg, ["model.c3=64,128", "model.c4=32"])
    assert jobs == [["model.c3=64", "model.c4=32"], ["model.c3=128", "model.c4=32"]]
    # each job gets its own readable folder (= TensorBoard run) under the sweep dir
    names = set()
    for job in jobs:
        job_cfg = compose_cfg(["experiment=cifar10_grid", *job], tmp_path)
        names.add(job_cfg.hydra.sweep.subdir)
        assert (job_cfg.model.net.c3, job_cfg.model.net.c4) == (int(job[0].split("=")[1]), 32)
    assert names == {"c3=64,c4=32", "c3=128,c4=32"}


def test_grid_models_have_the_reports_parameter_counts(tmp_path):
    # Fig. 6 / section 3.4: (256, 64) has 588k parameters, the best (256, 128) 998k
    cfg = compose_cfg(["experiment=cifar10_grid"], tmp_path)
    for c3, c4 in itertools.product(C3, C4):
        cfg.model.c3, cfg.model.c4 = c3, c4  # the net's c3/c4 interpolate these
        assert instantiate(cfg.model).num_parameters() == grid_net_params(c3, c4), (c3, c4)
    assert round(grid_net_params(256, 64), -3) == 588_000
    assert round(grid_net_params(256, 128), -3) == 998_000


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher"), ("slurm_gpu", "SlurmLauncher")])
def test_launchers_compose(launcher, target, tmp_path):
    cfg = compose_cfg(["experiment=cifar10_grid", f"hydra/launcher={launcher}"], tmp_path)
    assert cfg.hydra.launcher._target_.rsplit(".", 1)[-1] == target
    assert get_class(cfg.hydra.launcher._target_).__name__ == target  # the plugin is installed
    if launcher == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.array_parallelism >= 12


def test_ddp_trainer_composes_with_the_grid(tmp_path):
    cfg = compose_cfg(["experiment=cifar10_grid", "trainer=ddp"], tmp_path)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


# --------------------------------------------------------------------------------------------
# job bookkeeping of train.run_job (in process)
# --------------------------------------------------------------------------------------------

TINY_GRID_JOB = [
    "experiment=cifar10_grid", "datamodule=shapes", "datamodule.channels=3", "datamodule.image_size=32",
    "datamodule.n_train=48", "datamodule.val_size=16", "datamodule.n_test=16", "datamodule.batch_size=16",
    "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=none", "~callbacks.rich_progress_bar",
    "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
]


def test_failed_job_is_recorded_in_a_multirun_and_raised_in_a_single_run(tmp_path):
    from convlens.train import run_job

    cfg = compose_cfg(TINY_GRID_JOB + ["model.c3=0", "model.c4=8"], tmp_path)
    assert run_job(cfg, multirun=True) is None  # the sweep goes on
    status = jobs.read_status(tmp_path)
    assert status["status"] == "failed"
    # a ValueError (ConfigError, a ValueError the user can fix), named by its root cause
    assert status["error"].split(": ", 1)[0] in ("ValueError", "ConfigError")
    assert status["error"].split(": ", 1)[1].startswith("c3 and c4 must be positive filter counts")
    assert "model.c3=0" in status["overrides"] and "Traceback" in status["traceback"]
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(Exception, match="c3 and c4 must be positive"):
        run_job(cfg, multirun=False)


def test_failed_job_is_retried_and_its_old_outputs_cleared(tmp_path):
    from convlens.train import run_job

    overrides = TINY_GRID_JOB + ["model.c3=8", "model.c4=4"]
    cfg = compose_cfg(overrides, tmp_path)
    # an earlier attempt that failed after writing events and a checkpoint
    jobs.write_status(tmp_path, "running", overrides)
    jobs.write_status(tmp_path, "failed", overrides, error="RuntimeError: out of memory")
    stale_events = tmp_path / "tensorboard" / "events.out.tfevents.0.stale"
    stale_events.parent.mkdir()
    stale_events.write_bytes(b"old")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch007-val_acc0.9000.ckpt").write_bytes(b"old")

    best = run_job(cfg, multirun=True)
    status = jobs.read_status(tmp_path)
    assert status["status"] == "finished" and status["error"] is None
    assert status["attempts"][-1]["error"] == "RuntimeError: out of memory"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert best == metrics["val/acc_best"]
    assert not stale_events.exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if "0.9000" in p.name] == []

    # run again with skip_finished: nothing is trained (metrics.json untouched)
    before = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert run_job(cfg, multirun=True) == best
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == before


def test_finished_job_with_other_overrides_is_a_conflict_not_a_skip(tmp_path):
    from convlens.train import run_job

    jobs.write_status(tmp_path, "finished", ["model.c3=64", "model.c4=32"])
    (tmp_path / "metrics.json").write_text(json.dumps({"val/acc_best": 0.5}))
    cfg = compose_cfg(TINY_GRID_JOB + ["model.c3=64", "model.c4=32", "model.optimizer.lr=0.01"], tmp_path)
    assert run_job(cfg, multirun=True) is None  # reported; the finished job is left as it is
    assert jobs.read_status(tmp_path)["overrides"] == ["model.c3=64", "model.c4=32"]
    with pytest.raises(jobs.JobConflictError, match="hydra.sweep.subdir"):
        run_job(cfg, multirun=False)
    # the same overrides (in any order, skip_finished aside) are the same job
    assert jobs.finished_metrics(tmp_path, ["skip_finished=true", "model.c4=32", "model.c3=64"]) \
        == {"val/acc_best": 0.5}


def test_pick_checkpoint_prefers_the_best_over_last(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoints.pick_checkpoint(tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert checkpoints.pick_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "epoch003-val_acc0.8000.ckpt").write_bytes(b"")
    assert checkpoints.pick_checkpoint(tmp_path).name == "epoch003-val_acc0.8000.ckpt"


def test_summary_command_reports_a_missing_sweep_dir(tmp_path):
    assert sweep_summary.main([str(tmp_path / "nope")]) == 1
    with pytest.raises(sweep_summary.SweepError, match="No job found"):
        sweep_summary.collect(tmp_path)


# --------------------------------------------------------------------------------------------
# a real 2x2 multirun in a subprocess, then a rerun with a failing grid point
# --------------------------------------------------------------------------------------------

SWEEP_ARGS = [
    "experiment=cifar10_grid", "datamodule=shapes", "datamodule.channels=3", "datamodule.image_size=32",
    "datamodule.n_train=48", "datamodule.val_size=16", "datamodule.n_test=16", "datamodule.batch_size=16",
    "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=[model_checkpoint,deconv]",
    "callbacks.deconv.every_n_epochs=0", "callbacks.deconv.deconv_max=false",
    "callbacks.deconv.num_probe=1", "callbacks.deconv.k=1",
    "callbacks.deconv.layers=[conv3]",
    "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
]
GRID = {(8, 4), (8, 8), (16, 4), (16, 8)}


def _multirun(sweep_dir: Path, grid_args, cache: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """The sweep in a subprocess; it exits 0 when every job finished, 1 (after running every job and
    writing the summary) when one failed."""
    env = dict(os.environ, CONVLENS_CACHE=str(cache), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py", "-m", *SWEEP_ARGS, *grid_args, f"hydra.sweep.dir={sweep_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == returncode, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(sweep dir, first run's metrics.json mtimes, second run's output): a 2x2 grid, then the same
    sweep again with a third, invalid C3 (0) added."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "grid"
    _multirun(sweep_dir, ["model.c3=8,16", "model.c4=4,8"], root / "cache")
    first = {p.parent.name: (p.stat().st_mtime_ns, json.loads(p.read_text()))
             for p in sweep_dir.glob("*/metrics.json")}
    first_csv = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    rerun = _multirun(sweep_dir, ["model.c3=0,8,16", "model.c4=4,8"], root / "cache", returncode=1)
    return sweep_dir, first, first_csv, rerun


def _hparams_sessions(run_dir: Path) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    sessions = []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            sessions.append({k: v.number_value if v.HasField("number_value") else v.string_value
                             for k, v in data.session_start_info.hparams.items()})
    return sessions


@pytest.mark.slow
def test_sweep_runs_each_job_in_its_own_readable_run(sweep):
    sweep_dir, first, first_csv, _ = sweep
    assert set(first) == {f"c3={a},c4={b}" for a, b in GRID}
    assert len(first_csv) == 4 and {r["status"] for r in first_csv} == {"finished"}
    for row in first_csv:
        c3, c4 = int(row["c3"]), int(row["c4"])
        _, metrics = first[f"c3={c3},c4={c4}"]
        assert row["run"] == f"c3={c3},c4={c4}"
        assert int(row["params"]) == grid_net_params(c3, c4) == metrics["params"]
        assert float(row["test_acc"]) == pytest.approx(metrics["test/acc"], abs=1e-4)
        assert float(row["val_acc_best"]) == pytest.approx(metrics["val/acc_best"], abs=1e-4)


@pytest.mark.slow
def test_every_job_logs_callback_images_and_one_hparams_row(sweep):
    from conftest import read_events

    sweep_dir, first, _, _ = sweep
    keys = None
    for name, (_, metrics) in first.items():
        run = sweep_dir / name / "tensorboard"
        events = read_events(run)
        assert "deconv/conv3" in events["images"], sorted(events["images"])
        assert {"hp/val_acc", "hp/test_acc", "hp/params"} <= set(events["scalars"])
        assert "hp_metric" not in events["scalars"]  # no -1 placeholder
        (session,) = _hparams_sessions(run)
        c3, c4 = (int(v.split("=")[1]) for v in name.split(","))
        assert (session["c3"], session["c4"], session["params"]) == (c3, c4, grid_net_params(c3, c4))
        assert session["model"] == "cifar_convnet" and session["lr"] == pytest.approx(1e-4)
        assert session["batch_size"] == 16 and session["epochs"] == 1
        keys = keys or set(session)
        assert set(session) == keys  # the same columns for every run
    assert {"c3", "c4", "params", "lr", "batch_size", "max_epochs", "epochs", "model"} <= keys


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_records_the_failed_ones(sweep):
    sweep_dir, first, _, rerun = sweep
    for name, (mtime, _) in first.items():  # not trained again
        assert (sweep_dir / name / "metrics.json").stat().st_mtime_ns == mtime
        assert f"Skipping {sweep_dir / name}" in rerun.stdout + rerun.stderr
    rows = {r["run"]: r for r in csv.DictReader((sweep_dir / "summary.csv").open())}
    assert set(rows) == set(first) | {"c3=0,c4=4", "c3=0,c4=8"}
    for name in ("c3=0,c4=4", "c3=0,c4=8"):
        assert rows[name]["status"] == "failed"
        assert any(f"{kind}: c3 and c4 must be positive filter counts" in rows[name]["error"]
                   for kind in ("ValueError", "ConfigError"))
        assert jobs.read_status(sweep_dir / name)["status"] == "failed"
    for name, (_, metrics) in first.items():  # the others' results are kept
        assert rows[name]["status"] == "finished"
        assert float(rows[name]["test_acc"]) == pytest.approx(metrics["test/acc"], abs=1e-4)
    md = (sweep_dir / "summary.md").read_text()
    assert "6 jobs: 4 finished, 2 failed" in md and "c3 and c4 must be positive" in md
    # the failed jobs make the sweep exit 1 (asserted in _multirun), saying so in one line, last
    last = [ln for ln in rerun.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("convlens: SweepError") and "2 failed (c3=0,c4=4, c3=0,c4=8)" in last, last
    assert str(sweep_dir / "summary.md") in last


@pytest.mark.slow
def test_summary_plot_panels_and_tensorboard_run(sweep):
    from PIL import Image

    from conftest import read_events

    sweep_dir = sweep[0]
    for png in ("test_acc_vs_params.png", "deconv_conv3.png", "deconv_conv4.png"):
        with Image.open(sweep_dir / png) as im:
            assert im.width >= 200 and im.height >= 200, png
    # the panel grid: 3 C3 rows x 2 C4 columns of 96-pixel tiles, plus titles and the test image
    with Image.open(sweep_dir / "deconv_conv3.png") as im:
        assert im.width >= 2 * 96 and im.height >= 3 * 96 + 96
    events = read_events(sweep_dir / "summary")
    assert {"sweep/test_acc_vs_params", "sweep/deconv_conv3", "sweep/deconv_conv4"} <= set(events["images"])
    assert all(steps == [0] for steps in events["images"].values())  # regenerated, not appended


@pytest.mark.slow
def test_panel_cells_are_each_models_most_activated_map_projected(sweep):
    """Oracle: each checkpoint loaded by hand into a CifarConvNet, the most activated map found by
    a forward hook (highest maximum over positions), projected by viz.deconvnet.project."""
    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.cifar import CifarConvNet
    from convlens.viz.deconvnet import project

    sweep_dir = sweep[0]
    dm = ShapesDataModule(n_train=48, val_size=16, n_test=16, channels=3, image_size=32)
    dm.setup("test")
    image = dm.normalization(dm.test_set.images[:1])
    jobs = {j.name: j for j in sweep_summary.collect(sweep_dir)}
    got_image, _, _ = sweep_summary.test_image(jobs["c3=8,c4=4"].config, 0)
    torch.testing.assert_close(got_image, image)
    for c3, c4 in GRID:
        job = jobs[f"c3={c3},c4={c4}"]
        (ckpt,) = [p for p in (job.dir / "checkpoints").glob("epoch*.ckpt")]
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        oracle = CifarConvNet(c3, c4)
        oracle.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
        net = sweep_summary.load_net(job)
        # in the net's memory format (the recipe trains channels-last), so both run the same
        # convolution kernels: their float rounding differs otherwise, and a deconvnet's ReLUs
        # turn that into visible differences
        oracle = oracle.to(memory_format=torch.channels_last if net.conv1.weight.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format).eval()
        for layer in ("conv3", "conv4"):
            seen = {}
            handle = getattr(oracle, layer).register_forward_hook(lambda m, i, o: seen.update(out=o))
            with torch.no_grad():
                oracle(image)
            handle.remove()
            channel = int(seen["out"].amax(dim=(2, 3)).argmax())
            projection, got_channel = sweep_summary.most_activated_projection(net, image, layer)
            assert got_channel == channel
            torch.testing.assert_close(projection, project(oracle, image, layer, channel)[0])
