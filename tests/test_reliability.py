"""Issue 12: no work lost, no wrong number. Each case is reproduced with a fault: `kill -9` (SIGKILL)
of a subprocess at a chosen point, a tiny tmpfs for another filesystem and a full disk, read-only
mounts, a crafted pickle, bad command-line values; the entry points must answer with one line on
stderr and exit code 1 (no traceback), and keep every finished result."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_SHAPES, ROOT, compose_cfg, read_events
from convlens import jobs

# a single run of a few seconds: 2 batches of 16, one validation and test batch
TINY = ["experiment=shapes_demo", "datamodule.n_train=64", "datamodule.val_size=16", "datamodule.n_test=16",
        "datamodule.batch_size=16", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "++trainer.enable_model_summary=false"]
DECONV = ["callbacks=[model_checkpoint,deconv]", "callbacks.deconv.deconv_max=false", "callbacks.deconv.num_probe=2",
          "callbacks.deconv.k=1"]

# runs convlens-train with a fault injected (env CONVLENS_FAULT), for the subprocess tests
FAULT_SCRIPT = r'''
import os, shutil, signal, sys
import lightning.pytorch as pl

fault = dict(kv.split("=", 1) for kv in os.environ.get("CONVLENS_FAULT", "").split(";") if kv)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if "kill_at_epoch" in fault:
    # kill -9 when the first checkpoint of that epoch is about to be written, the epoch's events on disk
    epoch, save = int(fault["kill_at_epoch"]), pl.Trainer.save_checkpoint

    def save_checkpoint(self, filepath, *args, **kwargs):
        if self.current_epoch == epoch:
            for lg in self.loggers:
                lg.experiment.flush()
            die()
        return save(self, filepath, *args, **kwargs)

    pl.Trainer.save_checkpoint = save_checkpoint

if "kill_in_move" in fault:
    # kill -9 while the second last.ckpt is being put in place: during the copy of a move across
    # filesystems (what a rename becomes there), or just before the rename into place
    name, state = fault["kill_in_move"], {"replacing": False}
    move, sendfile, copyfileobj, replace = shutil.move, os.sendfile, shutil.copyfileobj, os.replace

    def patched_move(src, dst, *a, **k):
        state["replacing"] = os.path.basename(str(dst)) == name and os.path.exists(dst)
        try:
            return move(src, dst, *a, **k)
        finally:
            state["replacing"] = False

    def patched_sendfile(*a, **k):
        if state["replacing"]:
            die()
        return sendfile(*a, **k)

    def patched_copyfileobj(*a, **k):
        if state["replacing"]:
            die()
        return copyfileobj(*a, **k)

    def patched_replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == name and os.path.exists(dst):
            die()
        return replace(src, dst, *a, **k)

    shutil.move, os.sendfile, shutil.copyfileobj, os.replace = (
        patched_move, patched_sendfile, patched_copyfileobj, patched_replace)

from convlens.train import main
sys.argv[0] = "train.py"
main()
'''


def cli(args, script="train.py", fault=None, tmp=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run `python <script> args` (or the fault wrapper) in the checkout; stdout is a pipe (not a TTY)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if fault is not None:
        wrapper = Path(tmp) / "fault_train.py"
        wrapper.write_text(FAULT_SCRIPT)
        full_env["CONVLENS_FAULT"] = fault
        cmd = [sys.executable, str(wrapper), *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, no traceback anywhere, and the last stderr line is the `convlens: ...` message."""
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("convlens: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def tag_steps(run_dir: Path) -> dict[tuple[str, str], list[int]]:
    events = read_events(run_dir)
    return {(kind, tag): sorted(steps) for kind in events for tag, steps in events[kind].items()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def mounted(where: Path, options: str):
    """A tmpfs at `where` (we run as root in CI; skipped where mounting is not permitted)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --------------------------------------------------------------------------------------------
# 1. a rerun into an existing run dir never deletes a finished run
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rerun_into_a_finished_run_dir_is_refused_and_deletes_nothing(tmp_path):
    run = tmp_path / "D"
    first = cli(TINY + DECONV + [f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(run)
    assert "metrics.json" in before and any(k.startswith("checkpoints/") for k in before)
    assert any("events.out.tfevents" in k for k in before)

    second = cli(TINY + DECONV + ["callbacks.deconv.k=0", f"hydra.run.dir={run}"])
    line = assert_one_line_error(second, "RunDirExistsError", str(run), "finished run", "hydra.run.dir",
                                 f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "++overwrite=true")
    assert "metrics.json" in line and "last.ckpt" in line  # says what is there
    after = snapshot(run)
    # nothing deleted or rewritten: checkpoints, events, metrics.json, the run's own .hydra config
    assert {k: v for k, v in after.items() if k not in ("train.log",)} == \
        {k: v for k, v in before.items() if k not in ("train.log",)}


@pytest.mark.slow
def test_in_process_rerun_is_refused_and_overwrite_replaces_it(tmp_path):
    from convlens.train import run_job

    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1", "test=false"], tmp_path)
    run_job(cfg)
    first = json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(jobs.RunDirExistsError, match="overwrite"):
        run_job(compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1", "test=false"], tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == first
    # the explicit way out: ++overwrite=true trains again from scratch in that folder
    run_job(compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=2", "test=false",
                                       "++overwrite=true"], tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


# --------------------------------------------------------------------------------------------
# 2. an interrupted sweep job resumes from its own last.ckpt; 7. refused jobs, exit status
# --------------------------------------------------------------------------------------------

SWEEP = ["-m", "experiment=cifar10_grid", "datamodule=shapes", "datamodule.channels=3", "datamodule.image_size=32",
         "datamodule.n_train=48", "datamodule.val_size=16", "datamodule.n_test=16", "datamodule.batch_size=16",
         "trainer.max_epochs=3", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
         "callbacks=[model_checkpoint,deconv]", "callbacks.deconv.deconv_max=false", "callbacks.deconv.num_probe=1",
         "callbacks.deconv.k=1", "callbacks.deconv.layers=[conv3]", "++trainer.enable_progress_bar=false",
         "++trainer.enable_model_summary=false", "+hydra.callbacks.sweep_summary.panels=false", "model.c3=8"]


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """A 3-epoch, 2-job sweep killed with SIGKILL in its first job's third epoch (its last.ckpt of
    epoch 1 on disk), then the same command again."""
    root = tmp_path_factory.mktemp("isweep")
    sweep_dir = root / "grid"
    args = SWEEP + ["model.c4=4,8", f"hydra.sweep.dir={sweep_dir}"]
    killed = cli(args, fault="kill_at_epoch=2", tmp=root)
    job = sweep_dir / "c3=8,c4=4"
    state = {"killed": killed, "status": jobs.read_status(job),
             "last": torch.load(job / "checkpoints" / "last.ckpt", weights_only=True),
             "event_files": {p: p.stat().st_mtime_ns for p in (job / "tensorboard").glob("events.out.tfevents.*")}}
    state["rerun"] = cli(args)
    return sweep_dir, state


@pytest.mark.slow
def test_killed_sweep_job_resumes_from_its_last_ckpt(interrupted_sweep):
    sweep_dir, s = interrupted_sweep
    job = sweep_dir / "c3=8,c4=4"
    assert s["killed"].returncode == -signal.SIGKILL, s["killed"].stderr[-2000:]
    assert s["status"]["status"] == "running" and s["last"]["epoch"] == 1
    rerun = s["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming the interrupted job {job} from {job / 'checkpoints' / 'last.ckpt'}" in rerun.stdout + rerun.stderr
    status = jobs.read_status(job)
    assert status["status"] == "finished" and status["resumed_from"] == str(job / "checkpoints" / "last.ckpt")
    assert status["attempts"][-1]["status"] == "running"  # the killed attempt, kept in the record
    final = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == 2 and json.loads((job / "metrics.json").read_text())["epochs"] == 3
    # the killed run's own events are still there: it was resumed, not retrained from epoch 0
    assert all(p.exists() for p in s["event_files"])
    # each step logged once: the same tags and steps as the sweep's other job (the same schedule,
    # never interrupted)
    clean = tag_steps(sweep_dir / "c3=8,c4=8" / "tensorboard")
    assert ("scalars", "train/loss_step") in clean and ("images", "deconv/conv3") in clean
    assert clean[("scalars", "val/acc")] == [1, 3, 5]  # one per epoch (2 batches each)
    assert tag_steps(job / "tensorboard") == clean
    # probe images and layers came back from the checkpoint
    key = next(k for k in final["callbacks"] if k.startswith("DeconvProjection"))
    resumed, killed = final["callbacks"][key], s["last"]["callbacks"][key]

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    # the probe images (stored as they are, or as a shared pool and this callback's rows of it)
    probe = [k for k in ("probe_images", "probe_pool", "probe_index") if k in killed]
    assert probe and all(same(resumed[k], killed[k]) for k in probe), probe
    stored = [killed[k] for k in probe]
    assert any(isinstance(t, torch.Tensor) for v in stored for t in (v if isinstance(v, (tuple, list)) else [v]))
    assert resumed["layers"] == killed["layers"]


@pytest.mark.slow
def test_folder_clash_is_listed_as_refused_and_the_sweep_exits_nonzero(interrupted_sweep, tmp_path):
    import csv

    sweep_dir, _ = interrupted_sweep
    before = (sweep_dir / "c3=8,c4=4" / "metrics.json").read_bytes()
    # lr swept but missing from the folder name: both points map to the finished c3=8,c4=4
    r = cli(SWEEP + ["model.c4=4", "model.optimizer.lr=0.01,0.001", f"hydra.sweep.dir={sweep_dir}"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("convlens: SweepError") and "2 refused" in last and "summary.md" in last
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    refused = [row for row in rows if row["status"] == "refused"]
    assert len(refused) == 2 and all("JobConflictError" in row["error"] for row in refused)
    # named by the folder they clashed with and what they would have changed
    assert {row["run"] for row in refused} == {f"c3=8,c4=4 [refused: model.optimizer.lr={lr}]"
                                               for lr in ("0.001", "0.01")}
    assert {row["run"] for row in rows if row["status"] == "finished"} == {"c3=8,c4=4", "c3=8,c4=8"}
    assert "2 refused" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "c3=8,c4=4" / "metrics.json").read_bytes() == before  # left as it was


def test_clash_message_suggests_a_subdir_override_that_parses(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs.write_status(tmp_path, "finished", ["model.c3=64", "model.c4=32"])
    (tmp_path / "metrics.json").write_text("{}")
    compose_cfg(["experiment=cifar10_grid"], tmp_path)  # Hydra's runtime config: the grid's subdir
    with pytest.raises(jobs.JobConflictError) as e:
        jobs.finished_metrics(tmp_path, ["model.c3=64", "model.c4=32", "model.optimizer.lr=0.01"])
    message = str(e.value)
    suggested = message.split("e.g. ", 1)[1].split(" (quoted", 1)[0]
    (arg,) = shlex.split(suggested)  # what the shell passes on
    (override,) = OverridesParser.create().parse_overrides([arg])
    assert not override.is_sweep_override()
    # with it, the two clashing jobs get folders of their own
    names = {compose_cfg(["experiment=cifar10_grid", "model.c3=64", "model.c4=32", f"model.optimizer.lr={lr}", arg],
                         tmp_path).hydra.sweep.subdir for lr in (0.01, 0.001)}
    assert names == {"c3=64,c4=32,lr=0.01", "c3=64,c4=32,lr=0.001"}


# --------------------------------------------------------------------------------------------
# 3. resuming in the same dir: last.ckpt is current, no step twice
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_in_place_rewrites_last_ckpt_and_logs_each_step_once(tmp_path):
    from convlens.train import run_job

    base = TINY + ["callbacks=[model_checkpoint,deconv,evolution]"] + DECONV[1:] + [
        "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "test=false"]
    clean = tmp_path / "clean"
    run_job(compose_cfg(base, clean))
    run = tmp_path / "D"
    killed = cli(base + [f"hydra.run.dir={run}"], fault="kill_at_epoch=2", tmp=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1

    # the README's resume command, into the same run dir
    r = cli(base + [f"hydra.run.dir={run}", f"ckpt_path={last}"])
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and not [n for n in names if re.search(r"-v\d+\.ckpt$", n)], names
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert tag_steps(run / "tensorboard") == tag_steps(clean / "tensorboard")
    # the evolution callback's history and tracked maps continue, as in the clean run
    def evolution(path):
        state = torch.load(path, weights_only=True)["callbacks"]
        return next(v for k, v in state.items() if k.startswith("FilterEvolution"))
    a, b = evolution(last), evolution(clean / "checkpoints" / "last.ckpt")
    assert a["tracked_units"] == b["tracked_units"] and len(a["history"]) == len(b["history"]) == 3


# --------------------------------------------------------------------------------------------
# 4. crash-safe checkpoints: a kill during the move, a full disk, a broken checkpoint
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.root_faults
def test_kill_while_last_ckpt_is_put_in_place_leaves_the_previous_one(tmp_path):
    tmpdir = tmp_path / "tmpdir"  # $TMPDIR on the root filesystem; the run dir on a tmpfs
    tmpdir.mkdir()
    with mounted(tmp_path / "mnt", "size=64m") as mnt:
        run = mnt / "D"
        args = TINY + ["callbacks=none", "trainer.max_epochs=2", "test=false", f"hydra.run.dir={run}"]
        killed = cli(args, fault="kill_in_move=last.ckpt", tmp=tmp_path, env={"TMPDIR": str(tmpdir)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        last = run / "checkpoints" / "last.ckpt"
        assert last.stat().st_size > 0
        assert torch.load(last, weights_only=True)["epoch"] == 0  # the previous one, intact
        # resume: it goes on, and nothing of the killed write is left anywhere
        r = cli(args + ["trainer.max_epochs=3", f"ckpt_path={last}"], env={"TMPDIR": str(tmpdir)})
        assert r.returncode == 0, r.stderr[-3000:]
        assert torch.load(last, weights_only=True)["epoch"] == 2
        assert [p.name for p in run.rglob("*") if ".tmp" in p.name] == []
        assert [p.name for p in tmpdir.iterdir() if p.is_file() and p.stat().st_size > 100_000] == []


@pytest.mark.slow
@pytest.mark.root_faults
def test_full_disk_keeps_checkpoints_intact_and_records_the_failure(tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    # two LeNet checkpoints (3.6 MB each) fit, a third does not
    with mounted(tmp_path / "mnt", "size=9m") as mnt:
        run = mnt / "D"
        r = cli(TINY + ["callbacks=none", "trainer.max_epochs=3", "test=false", f"hydra.run.dir={run}"],
                env={"TMPDIR": str(tmpdir)})
        line = assert_one_line_error(r, "CheckpointWriteError", "disk is full", "ckpt_path=")
        assert "intact" in line
        status = jobs.read_status(run)
        assert status["status"] == "failed" and "CheckpointWriteError" in status["error"]
        ckpts = list((run / "checkpoints").glob("*.ckpt"))
        assert ckpts and all(torch.load(p, weights_only=True)["epoch"] == 0 for p in ckpts)
        assert [p.name for p in run.rglob("*") if ".tmp" in p.name] == []
        assert [p.name for p in tmpdir.iterdir() if p.is_file() and p.stat().st_size > 100_000] == []


def test_atomic_checkpoint_io_on_a_mocked_full_disk(tmp_path, monkeypatch):
    from convlens import checkpoints

    io = checkpoints.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError, match="disk is full.*previous last.ckpt is intact"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert io.load_checkpoint(path)["epoch"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("sig,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, jobs._Terminated)])
def test_interrupt_during_a_checkpoint_write_waits_for_a_whole_checkpoint(sig, raised, tmp_path, monkeypatch):
    """A Ctrl-C in the middle of torch.save used to break its zip writer, whose cleanup then raised a
    RuntimeError that hid the interrupt (the run was recorded as failed, with a bare traceback). Now
    the signal takes effect once the checkpoint is whole, as the interrupt it is."""
    from convlens import checkpoints

    real_save = torch.save

    def interrupted_save(obj, f, *a, **k):
        f.write(b"")  # the write is under way when the signal arrives
        signal.raise_signal(sig)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", interrupted_save)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    path = tmp_path / "last.ckpt"
    with jobs._sigterm_raises(), pytest.raises(raised):
        checkpoints.AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 4}, path)
    assert checkpoints.load_file(path, "checkpoint")["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored


def test_an_error_hiding_an_interrupt_marks_the_run_interrupted(tmp_path):
    """Whatever a library raises while cleaning up after Ctrl-C, the run is 'interrupted' (exit 130)."""
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none"], tmp_path)

    signal.signal(signal.SIGINT, signal.default_int_handler)

    def task(cfg):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # what Lightning does after a KeyboardInterrupt in fit
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(SystemExit) as e:
        jobs.job(task)(cfg)
    assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller keeps its Ctrl-C
    status = jobs.read_status(tmp_path)
    assert status["status"] == "interrupted" and status["error"] == "interrupted by SIGINT"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run: checkpoints/epoch00N-...ckpt (best) and last.ckpt."""
    from convlens.train import train

    out = tmp_path_factory.mktemp("finished")
    train(compose_cfg(FAST_SHAPES + ["callbacks=none", "test=false"], out))
    return out


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_broken_resume_checkpoint_names_the_newest_intact_one(damage, finished_run, tmp_path):
    from convlens.checkpoints import WeightsError
    from convlens.train import train

    folder = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", folder)
    (best,) = [p for p in folder.glob("epoch*.ckpt")]
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none", f"ckpt_path={last}"], tmp_path / "run")
    with pytest.raises(WeightsError) as e:
        train(cfg)
    message = str(e.value)
    assert str(last) in message and ("empty" in message if damage == "empty" else "truncated" in message)
    assert f"newest intact checkpoint in {folder} is {best.name}" in message and f"ckpt_path={best}" in message


# --------------------------------------------------------------------------------------------
# wrong numbers: 5. the image-folder test split, 6. seconds per epoch after a resume
# --------------------------------------------------------------------------------------------

def _image_tree(root: Path, per_class: int = 20, classes=("a", "b", "c"), empty=()) -> Path:
    from PIL import Image

    i = 0
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        if c in empty:
            continue
        for _ in range(per_class):
            # each image unique: its index written into the pixels
            pixels = bytes([(i >> 8) & 255, i & 255, 7]) * (8 * 8)
            Image.frombytes("RGB", (8, 8), pixels).save(root / "train" / c / f"{i:04d}.png")
            i += 1
    return root


def test_image_folder_without_test_holds_out_a_disjoint_deterministic_test_split(tmp_path):
    from convlens.datamodules.imagefolder import ImageFolderDataModule

    root = _image_tree(tmp_path / "imgs")

    def splits():
        dm = ImageFolderDataModule(root=str(root), image_size=8, normalization="none", val_size=0.2, test_size=0.2)
        dm.setup("fit")
        dm.setup("test")
        keys = {}
        for name in ("train", "val", "test"):
            images = getattr(dm, f"{name}_set").images.cpu()
            keys[name] = {(int(x[0, 0, 0]), int(x[1, 0, 0])) for x in images}
        return keys

    a = splits()
    assert len(a["test"]) == 12 and len(a["val"]) == 12 and len(a["train"]) == 36
    assert not (a["test"] & a["train"]) and not (a["test"] & a["val"]) and not (a["val"] & a["train"])
    assert splits() == a  # the same split on every run


def test_empty_class_folder_with_matching_num_classes_warns(tmp_path):
    from convlens.datamodules.imagefolder import ImageFolderDataModule

    root = _image_tree(tmp_path / "imgs", empty=("c",))
    with pytest.warns(UserWarning, match=r"\bc\b.*no image"):
        ImageFolderDataModule(root=str(root), image_size=8, num_classes=3)


def test_seconds_per_epoch_counts_only_the_epochs_of_a_resumed_fit(finished_run, tmp_path, monkeypatch):
    import types

    import convlens.train as train_mod

    ticks = iter([10.0])
    fake = types.SimpleNamespace(perf_counter=lambda: next(ticks, 110.0))  # the fit takes 100 s
    monkeypatch.setattr(train_mod, "time", fake)
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none", "test=false", "trainer.max_epochs=4",
                                     f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    metrics = train_mod.train(cfg)
    assert metrics["epochs"] == 4
    assert metrics["seconds_per_epoch"] == pytest.approx(100.0 / 2)  # epochs 3 and 4, not 100 / 4


# --------------------------------------------------------------------------------------------
# 8. safe loading: a crafted pickle is refused everywhere, nothing runs
# --------------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil_ckpt(tmp_path, finished_run):
    marker = tmp_path / "PWNED"
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"] = {"payload": _Evil(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.slow
def test_malicious_resume_checkpoint_is_refused_and_nothing_runs(evil_ckpt, tmp_path):
    path, marker = evil_ckpt
    r = cli(TINY + ["callbacks=none", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(r, "WeightsError", "Refused to load", str(path), "io.open")
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_checkpoint_is_refused_by_visualize(evil_ckpt, tmp_path):
    path, marker = evil_ckpt
    r = cli(["experiment=shapes_demo", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'viz'}"], script="visualize.py")
    assert_one_line_error(r, "WeightsError", "Refused to load", str(path))
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_the_sweep_summary(evil_ckpt, finished_run, tmp_path):
    from convlens import sweep_summary

    from omegaconf import OmegaConf, open_dict

    path, marker = evil_ckpt
    job = tmp_path / "sweep" / "c3=8,c4=4"
    (job / "checkpoints").mkdir(parents=True)
    (job / ".hydra").mkdir()
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none"], job)
    with open_dict(cfg):
        del cfg["hydra"]  # what Hydra saves as the job's .hydra/config.yaml
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), job / ".hydra" / "config.yaml")
    (job / "metrics.json").write_text(json.dumps({"test/acc": 0.5, "params": 1}))
    shutil.copy(path, job / "checkpoints" / "epoch001-val_acc0.5000.ckpt")
    result = sweep_summary.summarize(tmp_path / "sweep", layers=["conv1"])
    assert any("cannot load the model: WeightsError: Refused to load" in n for n in result.notes), result.notes
    assert not marker.exists()


def test_malicious_vgg16_weights_file_is_refused(evil_ckpt):
    from convlens.checkpoints import WeightsError
    from convlens.models.vgg import VGG16

    path, marker = evil_ckpt
    with pytest.raises(WeightsError, match="Refused to load"):
        VGG16(num_classes=10, weights=str(path))
    assert not marker.exists()


def test_every_checkpoint_load_of_a_run_is_weights_only(tmp_path, monkeypatch):
    """The test step loads the best checkpoint too: with weights_only=True, as every other load."""
    from convlens.train import train

    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    train(compose_cfg(FAST_SHAPES + ["callbacks=none", "trainer.max_epochs=1"], tmp_path))
    assert calls and all(w is True for w in calls), calls


# --------------------------------------------------------------------------------------------
# 9. downloads go to CONVLENS_CACHE; a read-only cache is no reason to stop
# --------------------------------------------------------------------------------------------

def test_vgg16_imagenet_weights_are_downloaded_into_convlens_cache(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    from convlens.checkpoints import WeightsError
    from convlens.models.vgg import VGG16

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    seen = {}

    def offline(url, model_dir=None, **kwargs):
        seen.update(model_dir=model_dir, **kwargs)
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="model.weights=/path/to/vgg16"):
        VGG16(weights="imagenet")
    assert Path(seen["model_dir"]).is_relative_to(tmp_path / "cache") and seen["weights_only"] is True


@pytest.mark.parametrize("how", ["not_a_folder", pytest.param("read_only_mount", marks=pytest.mark.root_faults)])
def test_unwritable_cache_falls_back_to_no_cache_with_one_warning(how, tmp_path, monkeypatch):
    import warnings

    from convlens.datamodules import base

    if how == "not_a_folder":
        (tmp_path / "file").write_text("x")
        cache = tmp_path / "file" / "cache"
        ctx = contextlib.nullcontext()
    else:
        cache = tmp_path / "ro"
        ctx = mounted(cache, "ro,size=1m")
    with ctx:
        monkeypatch.setenv("CONVLENS_CACHE", str(cache))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = base.cache_dir(), base.cache_dir()
        assert first == second and first != cache
        (first / "probe").write_bytes(b"ok")  # usable
        assert len([w for w in caught if "CONVLENS_CACHE" in str(w.message)]) == 1


@pytest.mark.root_faults
def test_mnist_in_data_dir_runs_with_a_read_only_cache(shared_data, tmp_path, monkeypatch):
    from convlens.datamodules.mnist import MNISTDataModule

    if not (shared_data / "MNIST" / "raw").is_dir():
        pytest.skip("no MNIST under DATA_DIR")
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        monkeypatch.setenv("CONVLENS_CACHE", str(ro))
        with pytest.warns(RuntimeWarning, match="without a cache"):
            dm = MNISTDataModule(root=str(shared_data), val_size=1000)
            dm.setup("fit")
        assert len(dm.train_set) > 0


# --------------------------------------------------------------------------------------------
# clear messages: one line on stderr, exit code 1, no traceback
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_seed_that_is_not_a_number(tmp_path):
    r = cli(TINY + ["callbacks=none", "seed=abc", f"hydra.run.dir={tmp_path / 'r'}"])
    assert_one_line_error(r, "ConfigError", "seed must be an integer", "'abc'")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "visualize.py"])
@pytest.mark.parametrize("kind", ["readme", "empty"])
def test_checkpoint_that_is_not_a_checkpoint(script, kind, tmp_path):
    ckpt = ROOT / "README.md" if kind == "readme" else tmp_path / "empty.ckpt"
    if kind == "empty":
        ckpt.write_bytes(b"")
    args = (TINY + ["callbacks=none"]) if script == "train.py" else ["experiment=shapes_demo"]
    r = cli(args + [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'r'}"], script=script)
    assert_one_line_error(r, "WeightsError", str(ckpt), "not a PyTorch file" if kind == "readme" else "empty")


@pytest.mark.slow
def test_visualize_without_ckpt_path(tmp_path):
    r = cli(["experiment=shapes_demo", f"hydra.run.dir={tmp_path / 'r'}"], script="visualize.py")
    assert_one_line_error(r, "ConfigError", "ckpt_path=")


@pytest.mark.slow
def test_callback_constructor_error_is_one_line(tmp_path):
    r = cli(TINY + DECONV + ["callbacks.deconv.k=0", f"hydra.run.dir={tmp_path / 'r'}"])
    assert_one_line_error(r, "ConfigError", "k (top units per probe image) must be an int >= 1, got 0")


@pytest.mark.slow
@pytest.mark.root_faults
def test_read_only_run_dir(tmp_path):
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        r = cli(TINY + ["callbacks=none", f"hydra.run.dir={ro / 'run'}"])
        assert_one_line_error(r, "RunDirError", str(ro / "run"), "hydra.run.dir")


@pytest.mark.slow
@pytest.mark.root_faults
def test_immutable_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("")
    if subprocess.run(["chattr", "+i", str(run / "train.log"), str(run)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        r = cli(TINY + ["callbacks=none", f"hydra.run.dir={run}"])
        assert_one_line_error(r, "RunDirError", str(run), "chattr -i")
    finally:
        subprocess.run(["chattr", "-i", str(run), str(run / "train.log")], capture_output=True)


@pytest.mark.slow
def test_ddp_on_cpu_with_batchnorm_turns_sync_batchnorm_off(tmp_path):
    args = ["experiment=cifar10_convnet", "datamodule=shapes", "datamodule.channels=3", "datamodule.image_size=32",
            "datamodule.n_train=64", "datamodule.val_size=16", "datamodule.n_test=16", "datamodule.batch_size=16",
            "callbacks=none", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
            "++trainer.limit_test_batches=1", "trainer.max_epochs=1", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=1", f"hydra.run.dir={tmp_path / 'r'}"]
    r = cli(args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "trainer.sync_batchnorm=true needs GPUs" in r.stdout + r.stderr
    assert (tmp_path / "r" / "metrics.json").is_file()
