"""The run guard (`convlens.run_guard`): the default run and sweep dirs are resolved before Hydra sets
its runtime config (issue 26.1: no `HydraConfig was not set` warning), a finished run is still
refused there; a sweep job never retrains over another job's results; a mistyped override key is
answered with the closest keys (issue 26.6), and a run that never started leaves no folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from conftest import FAST_SHAPES, ROOT, compose_cfg
from convlens import run_guard, run_status
from convlens.config import check_override_keys, closest_keys, compose_config, instantiate_checked
from convlens.errors import ConfigError

QUICK = ["experiment=shapes_demo", "debug=fdr", "datamodule.n_train=64", "datamodule.val_size=16",
         "datamodule.n_test=16"]


def config_at_start(overrides, cwd: Path, monkeypatch):
    """The config as Hydra hands it to the start callbacks: composed in `cwd` (`hydra.runtime.cwd`),
    Hydra's runtime config (`HydraConfig`) not set yet."""
    monkeypatch.chdir(cwd)
    cfg = compose_config(overrides)
    HydraConfig.instance().cfg = None
    return cfg


def hydra_callbacks(cfg):
    """Hydra's own callback runner: what turned the error into the reported UserWarning."""
    from hydra._internal.callbacks import Callbacks

    return Callbacks(cfg)


def finish_run(folder: Path, overrides=()) -> None:
    run_status.write_status(folder, "running", list(overrides))
    (folder / "metrics.json").write_text(json.dumps({"val/acc_best": 0.5}))
    run_status.write_status(folder, "finished", list(overrides))


# --------------------------------------------------------------------------------------------
# 26.1: the default run dir, an explicit one, a multirun
# --------------------------------------------------------------------------------------------

def test_default_run_dir_is_checked_without_a_warning(tmp_path, monkeypatch):
    cfg = config_at_start(QUICK, tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hydra_callbacks(cfg).on_run_start(config=cfg, config_name="train")
    assert HydraConfig.instance().cfg is None  # left as Hydra had it
    (run_dir,) = (tmp_path / "logs" / "debug" / "runs").iterdir()  # the default template, in the cwd
    assert run_guard.guarded(run_dir) and run_guard.made_by_this_run(run_dir)
    # Hydra resolves the dir again later: the same folder (the ${now:} of the check is kept)
    time.sleep(1.1)
    HydraConfig.instance().set_config(cfg)
    try:
        assert Path(str(cfg.hydra.run.dir)).absolute() == run_dir
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("where", ["default", "interpolated", "explicit"])
def test_finished_run_is_still_refused_before_hydra_writes(where, tmp_path, monkeypatch, capsys):
    extra = {"default": [], "interpolated": ["hydra.run.dir=${paths.log_dir}/fixed"],
             "explicit": [f"hydra.run.dir={tmp_path / 'D'}"]}[where]
    cfg = config_at_start(QUICK + extra, tmp_path, monkeypatch)
    run_dir = run_guard.hydra_dir(cfg, "hydra.run.dir")  # the folder this config's run would use
    assert run_dir.parent == {"default": tmp_path / "logs" / "debug" / "runs", "interpolated": tmp_path / "logs",
                              "explicit": tmp_path}[where]
    run_dir.mkdir(parents=True)
    finish_run(run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SystemExit) as e:
            hydra_callbacks(cfg).on_run_start(config=cfg, config_name="train")
    assert e.value.code == 1
    last = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()][-1]
    assert last.startswith("convlens: RunDirExistsError") and str(run_dir) in last and "finished run" in last
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_default_sweep_dir_is_resolved_for_the_sweeper(tmp_path, monkeypatch):
    cfg = config_at_start(QUICK, tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hydra_callbacks(cfg).on_multirun_start(config=cfg, config_name="train")
    # what Hydra's basic sweeper does next, still without its runtime config
    assert HydraConfig.instance().cfg is None
    sweep_dir = Path(cfg.hydra.sweep.dir)
    assert sweep_dir.parent == tmp_path / "logs" / "debug" / "multiruns" and sweep_dir.is_dir()


@pytest.mark.slow
def test_cli_default_dirs_warn_nothing_and_a_finished_run_is_refused(tmp_path):
    def cli(*args, flags=()):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *QUICK, *args], cwd=tmp_path,
                              text=True, capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=300)

    first = cli()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "RunGuard" not in first.stderr and "HydraConfig was not set" not in first.stderr, first.stderr
    (run,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    assert (run / "metrics.json").is_file()
    again = cli("hydra.run.dir=${paths.log_dir}/debug/runs/" + run.name)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    last = [ln for ln in again.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("convlens: RunDirExistsError") and str(run) in last
    sweep = cli("seed=1,2", flags=["-m"])
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "RunGuard" not in sweep.stderr and "HydraConfig was not set" not in sweep.stderr, sweep.stderr
    (sweep_dir,) = (tmp_path / "logs" / "debug" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0].endswith("seed=1") and jobs[1].endswith("seed=2")  # a folder each


# --------------------------------------------------------------------------------------------
# a sweep job never retrains over another job's results
# --------------------------------------------------------------------------------------------

TINY_JOB = FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1", "test=false"]


def test_sweep_job_refuses_a_folder_with_another_jobs_results(tmp_path):
    from convlens.train import run_job

    # a finished job trained with seed=1 (two sweep points that share a folder name)
    finish_run(tmp_path, TINY_JOB + ["seed=1"])
    metrics = (tmp_path / "metrics.json").read_bytes()
    assert run_job(compose_cfg(TINY_JOB + ["seed=2"], tmp_path), multirun=True) is None
    assert (tmp_path / "metrics.json").read_bytes() == metrics
    assert run_status.read_status(tmp_path)["overrides"] == TINY_JOB + ["seed=1"]

    # an interrupted job of other overrides: its checkpoints are kept, not cleared for a retry
    other = tmp_path / "other"
    run_status.write_status(other, "running", TINY_JOB + ["seed=1"])
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "last.ckpt").write_bytes(b"kept")
    with pytest.raises(run_guard.JobConflictError, match="unfinished job's checkpoints"):
        run_guard.check_job_dir(other, TINY_JOB + ["seed=2"])
    assert run_job(compose_cfg(TINY_JOB + ["seed=2"], other), multirun=True) is None
    assert (other / "checkpoints" / "last.ckpt").read_bytes() == b"kept"
    # the same overrides (bookkeeping keys aside) are the job's own folder
    run_guard.check_job_dir(other, TINY_JOB + ["seed=1", "skip_finished=true", "optimized_metric=val/loss"])


def test_seed_is_part_of_a_sweep_jobs_folder_name(tmp_path):
    names = {compose_cfg(["experiment=shapes_demo", f"seed={s}"], tmp_path).hydra.sweep.subdir for s in (1, 2)}
    assert names == {"seed=1", "seed=2"}  # `experiment` is left out of folder names


def test_long_job_folder_names_are_shortened_and_kept_apart():
    from convlens.config import short_dirname

    assert short_dirname("model.c3=8,model.c4=4") == "model.c3=8,model.c4=4"
    common = ",".join(f"++trainer.option_{i}=value_{i}" for i in range(12))
    a, b = (short_dirname(f"{common},model.optimizer.lr={lr}") for lr in (0.01, 0.02))
    assert a != b and len(a.encode()) <= 200 and len(b.encode()) <= 200
    assert a.startswith("option_0=value_0,option_1=value_1")  # the last part of each key


# --------------------------------------------------------------------------------------------
# 26.6: a mistyped key
# --------------------------------------------------------------------------------------------

def test_closest_keys_prefer_the_siblings_of_the_missing_key():
    tree = {"trainer": {"max_epochs": 1, "min_epochs": 1, "devices": 1}, "model": {"c3": 8, "net": {"c3": 8}}}
    assert closest_keys("trainer.max_epoch", tree)[0] == "trainer.max_epochs"
    assert closest_keys("traner.max_epochs", tree)[0] == "trainer.max_epochs"
    assert closest_keys("model.net.c33", tree)[0] == "model.net.c3"
    assert closest_keys("model.zzz", tree) == []  # nothing near, and not the parent `model` itself


@pytest.mark.parametrize("overrides,suggested", [
    (["trainer.max_epoch=1"], "`trainer.max_epochs`"),
    (["experiment=shapes_demo", "traner.max_epochs=1"], "`trainer.max_epochs`"),
    (["optimised_metric=val/loss"], "`optimized_metric`"),
    (["model.optimizer.learning_rate=0.1"], "`model.optimizer.lr`"),
    (["experiment=cifar10_grid", "model.c5=8,16"], "`model.c3`"),   # in a sweep too
    (["callbacks=none", "callbacks.deconv.k=1"], "`callbacks` has: model_checkpoint"),
    # an argument the Trainer takes but the config does not set: how to add it
    (["trainer.limit_train_batches=2"], "add it with `+trainer.limit_train_batches=...`"),
])
def test_mistyped_key_is_answered_with_the_closest_keys(overrides, suggested):
    with pytest.raises(ConfigError) as e:
        check_override_keys(overrides)
    message = str(e.value)
    assert suggested in message and "\n" not in message and "nothing was run" in message


@pytest.mark.parametrize("overrides", [
    ["experiment=cifar10_grid", "model.c3=8,16", "model.c4=4"],         # a sweep of existing keys
    ["model.optimizer.lr=interval(0.001,0.1)", "hydra/sweeper=basic"],   # an optuna search space
    ["+trainer.max_epoch=1"],                                             # an added key: the Trainer judges it
    ["model=lenet,vgg16", "model.weights=null"],                          # a sweep of groups: Hydra judges
    ["model.optimizer={_target_:torch.optim.Adam,lr:1}", "model.optimizer.betas=[0.9,0.99]"],
    ["datamodule=imagefolder", "datamodule.root=/data"],                  # a ??? value is a key too
    ["hydra.job.chdir=false", "~callbacks.rich_progress_bar"],
])
def test_valid_command_lines_pass_the_key_check(overrides):
    check_override_keys(overrides)


def test_an_argument_the_target_does_not_take_names_the_closest(tmp_path):
    cfg = compose_cfg(["experiment=shapes_demo", "+trainer.max_epoch=1"], tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.max_epoch: Trainer takes no argument `max_epoch`; "
                                          r"did you mean `trainer.max_epochs`"):
        instantiate_checked(cfg.trainer, "trainer", logger=False)


def test_a_run_that_never_started_leaves_no_folder(tmp_path, monkeypatch):
    from convlens.train import run_job

    for name, made_here in (("new", True), ("existing", False)):
        run = tmp_path / name
        if not made_here:
            run.mkdir()
        start = config_at_start(QUICK + ["+trainer.max_epoch=1", f"hydra.run.dir={run}"], tmp_path, monkeypatch)
        hydra_callbacks(start).on_run_start(config=start, config_name="train")
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text("{}")  # what Hydra writes next
        with pytest.raises(ConfigError, match="did you mean `trainer.max_epochs`"):
            run_job(compose_cfg(QUICK + ["+trainer.max_epoch=1"], run))
        if made_here:
            assert not run.exists()
        else:  # a folder that was there before is never deleted; the failure is recorded in it
            assert run_status.read_status(run)["status"] == "failed"


@pytest.mark.slow
def test_cli_typo_is_one_line_and_leaves_no_run_dir(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *QUICK, *args], cwd=tmp_path, text=True,
                              capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=300)

    for arg, needle in (("trainer.max_epoch=1", "the config has no key `trainer.max_epoch`"),
                        ("+trainer.max_epoch=1", "Trainer takes no argument `max_epoch`")):
        r = cli(arg)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert lines[-1].startswith("convlens: ConfigError") and needle in lines[-1], lines[-1]
        assert "did you mean `trainer.max_epochs`" in lines[-1]
        if not arg.startswith("+"):
            assert len(lines) == 1 and "+trainer.max_epoch" not in r.stderr  # not Hydra's advice
        runs = tmp_path / "logs" / "debug" / "runs"
        assert not runs.exists() or list(runs.iterdir()) == [], list(runs.iterdir())
