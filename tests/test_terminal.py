"""Issue 15 item 4, terminal and files: a quiet normal run, progress as log lines when stdout is not a
terminal, the run in train.log, Ctrl-C / SIGTERM recorded as "interrupted", no empty TensorBoard run
left by a run that failed before its first epoch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import FAST_SHAPES, ROOT, compose_cfg
from convlens import jobs

TINY = ["experiment=shapes_demo", "callbacks=none", "datamodule.n_train=64", "datamodule.val_size=16",
        "datamodule.n_test=16", "datamodule.batch_size=16", "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1", "trainer.accelerator=cpu"]


def _run(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.slow
def test_normal_run_is_quiet_shows_progress_in_a_log_file_and_fills_train_log(tmp_path):
    run = tmp_path / "run"
    r = _run(TINY + ["trainer.max_epochs=2", f"hydra.run.dir={run}"])  # stdout is a pipe, as with nohup
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    for noise in ("litlogger", "LeafSpec", "FLOPs", "Skipping setting a default"):
        assert noise not in out, noise
    assert "Model summary:" in out and "Params" in out and "431 K" in out  # the summary, minus FLOPs
    # progress without a terminal: a log line per epoch (no Rich live display)
    assert "Epoch 1/2 done in" in r.stdout and "Epoch 2/2 done in" in r.stdout and "val/acc=" in r.stdout
    log = (run / "train.log").read_text()
    for line in ("Training LeNet on ShapesDataModule", "Epoch 1/2 done in", "Epoch 2/2 done in",
                 "`Trainer.fit` stopped", "Finished: val/acc_best="):
        assert line in log, line


def test_progress_is_rich_on_a_terminal_and_log_lines_otherwise(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from convlens import terminal

    monkeypatch.setattr(terminal, "stdout_is_terminal", lambda: True)
    assert isinstance(terminal.progress_bar(), RichProgressBar)
    monkeypatch.setattr(terminal, "stdout_is_terminal", lambda: False)
    bar = terminal.progress_bar(log_interval_s=5)
    assert isinstance(bar, terminal.LogProgress) and bar.interval_s == 5


def test_log_progress_reports_batches_at_its_interval(tmp_path, caplog, monkeypatch):
    from convlens import terminal
    from convlens.train import train

    overrides = [o for o in FAST_SHAPES if not o.startswith("debug=")]  # debug turns progress off
    cfg = compose_cfg(overrides + ["trainer.accelerator=cpu", "++trainer.enable_model_summary=false",
                                   "callbacks=none", "trainer.max_epochs=1", "test=false",
                                   "++trainer.limit_train_batches=3", "callbacks.rich_progress_bar.log_interval_s=0"],
                      tmp_path)
    monkeypatch.setattr(terminal, "stdout_is_terminal", lambda: False)
    with caplog.at_level("INFO", logger="convlens"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "convlens"]
    assert [ln.split(",")[0] for ln in lines if "batch" in ln] == \
        ["Epoch 1/1: batch 1/3 (33%)", "Epoch 1/1: batch 2/3 (67%)", "Epoch 1/1: batch 3/3 (100%)"]
    assert any(ln.startswith("Epoch 1/1 done in") and "val/acc=" in ln for ln in lines)


def test_pytest_filter_matches_the_leafspec_warning():
    """The filterwarnings entry of pyproject.toml hides the warning torch raises."""
    import tomllib

    from _pytest.config import parse_warning_filter
    from torch.utils import _pytree

    entries = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    (entry,) = [e for e in entries if "LeafSpec" in e]
    action, message, category, module, lineno = parse_warning_filter(entry, escape=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        warnings.filterwarnings(action, message, category, module, lineno)
        _pytree.LeafSpec()
    assert caught == [], [str(w.message) for w in caught]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_mark_the_run_interrupted(sig, code, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # a shell's background job (`pytest &`) ignores SIGINT, and its children inherit that: give the
    # run Ctrl-C's usual meaning, as in a terminal
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "trainer.max_epochs=500", f"hydra.run.dir={run}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").is_file():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started"
            time.sleep(0.1)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    status = jobs.read_status(run)
    assert status["status"] == "interrupted" and status["error"] == f"interrupted by {sig.name}"
    assert status["ended"] is not None
    assert "Traceback" not in stdout + stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"convlens: interrupted by {sig.name}")
    assert f"resume with ckpt_path={run / 'checkpoints' / 'last.ckpt'} hydra.run.dir={run}" in last


@pytest.mark.parametrize("bad", ["callbacks.deconv.layers=[nope]", "model.optimizer.lr=1e30"])
def test_run_that_fails_before_its_first_epoch_leaves_no_tensorboard_run(bad, tmp_path):
    from convlens.train import run_job

    callbacks = ["callbacks=[model_checkpoint,deconv]"] if "deconv" in bad else ["callbacks=none"]
    cfg = compose_cfg(FAST_SHAPES + callbacks + ["trainer.max_epochs=1", bad], tmp_path)
    with pytest.raises(Exception) as e:
        run_job(cfg)
    assert type(e.value).__name__ in ("LayerError", "NonFiniteLossError")
    assert list(tmp_path.rglob("events.out.tfevents.*")) == []
    assert not (tmp_path / "tensorboard").exists()
    assert jobs.read_status(tmp_path)["status"] == "failed"  # the failure itself is kept
