"""callbacks/sink.py: the visualizations reach every Lightning logger, read back from each one's own store.

Oracles: images are decoded from what each logger stored (TensorBoard event files, the W&B offline
run's media files, MLflow artifacts in a real sqlite tracking database, PNG files) and compared
pixel for pixel with the input truncated to uint8 and enlarged by a hand-computed factor; steps with
the steps of Lightning's own validation scalars in the same store; histograms with counts made by a
naive loop over the values; the W&B offline run is read record by record from its `.wandb` file
(the LevelDB log format, each record a `wandb_internal_pb2.Record`, checksums verified).
"""
from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from convlens.callbacks import sink
from convlens.callbacks.evolution import FilterEvolution
from convlens.datamodules.shapes import ShapesDataModule
from convlens.errors import ConvlensError
from convlens.events import read_events, read_images
from convlens.models.lenet import LeNet
from convlens.models.module import ClassifierModule

pytestmark = pytest.mark.usefixtures("one_thread")

LENET_CONVS = ["conv1", "conv2", "conv3", "conv4"]
# a 40 px wide image is shown 9 times larger: the smallest integer factor that brings it to the
# 343 px TensorBoard card width (render.MIN_LOGGED_WIDTH), by hand: ceil(343 / 40) = 9
WIDTH, FACTOR = 40, 9


# -- builders and readers ----------------------------------------------------------------------

def trainer_with(root: Path, loggers, callbacks=(), max_epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=max_epochs, logger=loggers,
                      callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=1)


def tiny_fit(trainer: pl.Trainer) -> None:
    module = ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    trainer.fit(module, datamodule=ShapesDataModule(n_train=192, n_test=64, val_size=64, batch_size=64))


def expected_pixels(image: torch.Tensor) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3], truncated (as TensorBoard's add_image) and enlarged FACTOR times."""
    hwc = np.floor(image.clamp(0, 1).permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
    hwc = np.kron(hwc, np.ones((FACTOR, FACTOR, 1), np.uint8))
    return hwc[:, :, 0] if hwc.shape[2] == 1 else hwc


def decode(png: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        return np.asarray(im)


def naive_counts(values: np.ndarray, bins: int) -> list[int]:
    """Equal-width bins over [min, max], the last one closed: one value at a time."""
    lo, hi = float(values.min()), float(values.max())
    counts = [0] * bins
    for v in values.tolist():
        counts[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
    return counts


def tb_text_and_histograms(logdir: Path) -> tuple[dict, dict]:
    """({tag: [(step, text)]}, {tag: [(step, HistogramValue)]}) of the event files under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts, histograms = {}, {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"tensors": 0, "histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.endswith("/text_summary"):
                texts.setdefault(tag[: -len("/text_summary")], []).extend(
                    (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag))
        for tag in acc.Tags()["histograms"]:
            histograms.setdefault(tag, []).extend((e.step, e.histogram_value) for e in acc.Histograms(tag))
    return texts, histograms


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB log records (crc32, length, type; FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # the record is still being written
            return
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        parts = [chunk] if kind in (1, 2) else parts + [chunk]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def wandb_history(wandb_dir: Path, timeout: float = 60) -> tuple[Path, list[dict]]:
    """(the offline run's folder, its history rows as {key: value}, nested keys joined with '/').
    W&B's service process may still be writing the log when `finish()` returns: it is read again
    until its last record, `exit`, is there."""
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(next(runs[0].glob("run-*.wandb"))))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert records and records[-1].WhichOneof("record_type") == "exit", "the W&B run log was not completed"
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]
    return runs[0], rows


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every file under tmp_path; the run is finished (its log flushed) after the test."""
    pytest.importorskip("wandb")
    import wandb

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                        "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(name, str(value))
    warnings.filterwarnings("ignore", message=".*anonymous setting.*")
    yield tmp_path
    wandb.finish()


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One real sqlite tracking database for the module (creating its tables takes seconds)."""
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_logger(db: str, tmp_path: Path) -> MLFlowLogger:
    return MLFlowLogger(experiment_name=f"convlens-{tmp_path.name}", tracking_uri=db,
                        artifact_location=str(tmp_path / "mlflow-artifacts"))


def mlflow_artifact(db: str, run_id: str, path: str, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=db))


# -- every kind of record, per logger ----------------------------------------------------------

def log_everything(trainer, image, values, step=5):
    sink.log_image(trainer, "viz/img", image, step, caption="a caption")
    sink.log_scalars(trainer, {"viz/score": 0.25}, step)
    sink.log_text(trainer, "viz/table", "| a | b |\n|---|---|\n| 1 | 2 |", step)
    sink.log_histogram(trainer, "viz/hist", values, step)


@pytest.fixture
def records():
    torch.manual_seed(0)
    return torch.rand(3, 7, WIDTH), torch.randn(500)


def test_tensorboard(tmp_path, records):
    image, values = records
    gray = torch.rand(1, 5, WIDTH)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = trainer_with(tmp_path, [tb])
    log_everything(trainer, image, values)
    sink.log_image(trainer, "viz/gray", gray, 6)
    tb.experiment.flush()
    images = read_images(tmp_path / "tb")
    assert [s for s, _ in images["viz/img"]] == [5] and [s for s, _ in images["viz/gray"]] == [6]
    np.testing.assert_array_equal(decode(images["viz/img"][0][1]), expected_pixels(image))
    np.testing.assert_array_equal(decode(images["viz/gray"][0][1]), expected_pixels(gray))
    assert read_events(tmp_path / "tb")["scalars"]["viz/score"] == [5]
    texts, histograms = tb_text_and_histograms(tmp_path / "tb")
    assert texts["viz/table"] == [(5, "| a | b |\n|---|---|\n| 1 | 2 |")]
    [(step, h)] = histograms["viz/hist"]
    assert step == 5 and h.num == 500 and sum(h.bucket) == 500
    assert (h.min, h.max) == pytest.approx((values.min().item(), values.max().item()))
    assert h.sum == pytest.approx(values.double().sum().item(), abs=1e-6)
    assert not (tmp_path / "viz").exists()  # TensorBoard takes everything: no files beside it


def test_csv_logger_files(tmp_path, records):
    image, values = records
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = trainer_with(tmp_path, [csv_logger])
    log_everything(trainer, image, values)
    csv_logger.save()
    viz = Path(csv_logger.log_dir) / "viz"
    assert viz.parent == tmp_path / "csv" / "version_0"
    np.testing.assert_array_equal(decode(viz / "viz/img/step0000005.png"), expected_pixels(image))
    assert (viz / "viz/table/step0000005.txt").read_text() == "| a | b |\n|---|---|\n| 1 | 2 |"
    hist = json.loads((viz / "viz/hist/step0000005.json").read_text())
    assert hist["step"] == 5 and hist["count"] == 500 and len(hist["edges"]) == sink.HISTOGRAM_BINS + 1
    assert hist["counts"] == naive_counts(values.double().numpy(), sink.HISTOGRAM_BINS)
    assert (hist["min"], hist["max"]) == pytest.approx((values.min().item(), values.max().item()))
    metrics = (Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert metrics[0].split(",") == ["step", "viz/score"] and metrics[1].split(",") == ["5", "0.25"]
    assert sorted(p.name for p in viz.rglob("*") if p.is_file()) == ["step0000005.json", "step0000005.png",
                                                                     "step0000005.txt"]  # no temporary files
    assert not (tmp_path / "viz").exists()


class RecordingLogger(Logger):
    """A logger that is none of the known ones: it takes only metrics."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    name, version = "recording", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_other_logger_and_no_logger_write_files_under_the_root(tmp_path, records):
    image, values = records
    other, another = RecordingLogger(), RecordingLogger()
    log_everything(trainer_with(tmp_path / "other", [other, another]), image, values)
    assert other.metrics == another.metrics == [({"viz/score": 0.25}, 5)]
    log_everything(trainer_with(tmp_path / "none", False), image, values)
    assert not (tmp_path / "other" / "viz" / "scalars.csv").exists()  # the loggers took the scalars
    assert (tmp_path / "none" / "viz" / "scalars.csv").read_text().splitlines() == ["step,tag,value",
                                                                                    "5,viz/score,0.25"]
    for root in ("other", "none"):
        viz = tmp_path / root / "viz"
        np.testing.assert_array_equal(decode(viz / "viz/img/step0000005.png"), expected_pixels(image))
        assert (viz / "viz/table/step0000005.txt").exists() and (viz / "viz/hist/step0000005.json").exists()


def test_log_dir(tmp_path):
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    assert sink.log_dir(trainer_with(tmp_path, [RecordingLogger(), tb, csv_logger])) == Path(tb.log_dir)
    assert sink.log_dir(trainer_with(tmp_path, [csv_logger])) == Path(csv_logger.log_dir)
    assert sink.log_dir(trainer_with(tmp_path, [RecordingLogger()])) == tmp_path
    assert sink.log_dir(trainer_with(tmp_path, False)) == tmp_path


def test_wandb_offline_run(wandb_env, records):
    image, values = records
    gray = torch.rand(1, 5, WIDTH)
    wb = WandbLogger(save_dir=str(wandb_env), project="convlens-test", offline=True)
    trainer = trainer_with(wandb_env, [wb])
    wb.log_metrics({"val/acc": 0.5}, step=5)  # as Lightning logs an epoch's validation scalars
    log_everything(trainer, image, values)
    sink.log_image(trainer, "viz/gray", gray, 6)
    wb.experiment.finish()
    run, rows = wandb_history(wandb_env)

    def row(key):
        [found] = [r for r in rows if key in r]
        return found

    # the step is Lightning's: the row's trainer/global_step, as for the validation scalars
    assert row("val/acc")["trainer/global_step"] == 5
    assert row("viz/img/_type")["trainer/global_step"] == 5 and row("viz/gray/_type")["trainer/global_step"] == 6
    img = row("viz/img/_type")
    assert img["viz/img/captions"] == ["a caption"] and "viz/gray/captions" not in row("viz/gray/_type")
    np.testing.assert_array_equal(decode(run / "files" / img["viz/img/filenames"][0]), expected_pixels(image))
    gray_row = row("viz/gray/_type")
    np.testing.assert_array_equal(decode(run / "files" / gray_row["viz/gray/filenames"][0]), expected_pixels(gray))
    assert row("viz/score")["viz/score"] == 0.25 and row("viz/score")["trainer/global_step"] == 5
    table = row("viz/table/_type")
    assert table["viz/table/_type"] == "table-file" and table["trainer/global_step"] == 5
    stored = json.loads((run / "files" / table["viz/table/path"]).read_text())
    assert stored["columns"] == ["text"] and stored["data"] == [["| a | b |\n|---|---|\n| 1 | 2 |"]]
    hist = row("viz/hist/_type")
    assert hist["viz/hist/_type"] == "histogram" and sum(hist["viz/hist/values"]) == 500
    assert (hist["viz/hist/bins"][0], hist["viz/hist/bins"][-1]) == pytest.approx(
        (values.min().item(), values.max().item()))
    assert not (wandb_env / "viz").exists()


def test_mlflow_sqlite_tracking(mlflow_db, tmp_path, records):
    from mlflow.tracking import MlflowClient

    image, values = records
    ml = mlflow_logger(mlflow_db, tmp_path)
    trainer = trainer_with(tmp_path, [ml])
    log_everything(trainer, image, values)
    sink.log_scalars(trainer, {"viz/score": 0.5}, 7)
    client = MlflowClient(mlflow_db)
    run_id = ml.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "viz/score")] == [(5, 0.25), (7, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id, "viz/viz/img")] == ["viz/viz/img/step0000005.png"]
    png = mlflow_artifact(mlflow_db, run_id, "viz/viz/img/step0000005.png", tmp_path / "download")
    np.testing.assert_array_equal(decode(png), expected_pixels(image))
    text = mlflow_artifact(mlflow_db, run_id, "viz/viz/table/step0000005.txt", tmp_path / "download")
    assert text.read_text() == "| a | b |\n|---|---|\n| 1 | 2 |"
    hist = json.loads(mlflow_artifact(mlflow_db, run_id, "viz/viz/hist/step0000005.json",
                                      tmp_path / "download").read_text())
    assert hist["counts"] == naive_counts(values.double().numpy(), sink.HISTOGRAM_BINS)
    assert not (tmp_path / "viz").exists()


# -- a real fit into every logger at once ------------------------------------------------------

def test_fit_into_every_logger_at_once(wandb_env, mlflow_db):
    from mlflow.tracking import MlflowClient

    tmp_path = wandb_env
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    wb = WandbLogger(save_dir=str(tmp_path), project="convlens-test", offline=True)
    ml = mlflow_logger(mlflow_db, tmp_path)
    trainer = trainer_with(tmp_path, [tb, wb, ml, csv_logger], [FilterEvolution(num_probe=2)], max_epochs=2)
    tiny_fit(trainer)
    wb.experiment.finish()

    # the oracle of the steps: where Lightning put each epoch's validation scalars
    events = read_events(tmp_path / "tb")
    steps = sorted(events["scalars"]["val/acc"])
    assert len(steps) == 2
    tags = [f"evolution/{layer}" for layer in LENET_CONVS] + ["evolution/weights_conv1"]
    images = read_images(tmp_path / "tb")
    for tag in tags:
        assert [s for s, _ in images[tag]] == steps, tag
    assert [s for s, _ in images["evolution/summary"]] == steps[-1:]
    scalar_tags = [f"evolution_weight_change/{layer}" for layer in LENET_CONVS] + ["viz_time/evolution"]
    for tag in scalar_tags:
        assert sorted(events["scalars"][tag]) == steps, tag

    # W&B: the same images at the same trainer/global_step, each file the same pixels as TensorBoard's
    run, rows = wandb_history(tmp_path)
    for tag in tags + ["evolution/summary"]:
        logged = [(r["trainer/global_step"], r[f"{tag}/filenames"][0]) for r in rows if f"{tag}/filenames" in r]
        assert [s for s, _ in logged] == [s for s, _ in images[tag]], tag
        for (_, name), (_, png) in zip(logged, images[tag]):
            np.testing.assert_array_equal(decode(run / "files" / name), decode(png))
    for tag in scalar_tags:
        assert [r["trainer/global_step"] for r in rows if tag in r] == steps, tag
    assert [r["trainer/global_step"] for r in rows if "val/acc" in r] == steps

    # MLflow: an artifact per image per epoch, the scalars at the same steps as Lightning's
    client = MlflowClient(mlflow_db)
    assert [m.step for m in client.get_metric_history(ml.run_id, "val/acc")] == steps
    for tag in scalar_tags:
        assert [m.step for m in client.get_metric_history(ml.run_id, tag)] == steps, tag
    for tag in tags:
        assert [a.path for a in client.list_artifacts(ml.run_id, f"viz/{tag}")] == \
            [f"viz/{tag}/step{s:07d}.png" for s in steps], tag
    png = mlflow_artifact(mlflow_db, ml.run_id, f"viz/evolution/summary/step{steps[-1]:07d}.png", tmp_path / "dl")
    np.testing.assert_array_equal(decode(png), decode(images["evolution/summary"][0][1]))

    # CSV: PNG files under its own log dir, the scalars in its metrics.csv
    viz = Path(csv_logger.log_dir) / "viz"
    for tag in tags:
        assert sorted(p.name for p in (viz / tag).glob("*.png")) == [f"step{s:07d}.png" for s in steps], tag
    np.testing.assert_array_equal(decode(viz / f"evolution/summary/step{steps[-1]:07d}.png"),
                                  decode(images["evolution/summary"][0][1]))
    header = (Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(scalar_tags) <= set(header)
    assert not (tmp_path / "viz").exists()


# -- failures and imports ----------------------------------------------------------------------

class _NoImageWriter:
    """A SummaryWriter whose event file cannot take images (a full disk, say); all else works."""

    def __init__(self, writer):
        self._writer = writer

    def _get_file_writer(self):
        raise OSError("No space left on device")

    def __getattr__(self, name):
        return getattr(self._writer, name)


class FlakyTensorBoard(TensorBoardLogger):
    @property
    def experiment(self):
        return _NoImageWriter(super().experiment)


def test_a_failing_logger_warns_once_and_training_goes_on(tmp_path):
    flaky, csv_logger = FlakyTensorBoard(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = trainer_with(tmp_path, [flaky, csv_logger], [FilterEvolution(num_probe=2)], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_fit(trainer)
    assert trainer.current_epoch == 2  # the fit ran to its end
    ours = [str(w.message) for w in caught if "convlens: FlakyTensorBoard failed" in str(w.message)]
    assert len(ours) == 1, ours  # images of 2 epochs x 6 tags failed: one warning
    assert "No space left on device" in ours[0] and "training goes on" in ours[0]
    viz = Path(csv_logger.log_dir) / "viz"  # the other logger got everything
    assert len(list((viz / "evolution").rglob("*.png"))) == 2 * 5 + 1
    assert sorted(read_events(tmp_path / "tb")["scalars"]["viz_time/evolution"]) == \
        sorted(read_events(tmp_path / "tb")["scalars"]["val/acc"])


def test_bad_image_is_a_clear_error(tmp_path):
    trainer = trainer_with(tmp_path, False)
    with pytest.raises(ConvlensError, match=r"log_image\('x'\) needs a \[1\|3, H, W\] image tensor, got \[2, 4, 4\]"):
        sink.log_image(trainer, "x", torch.rand(2, 4, 4), 0)


def test_histogram_without_finite_values_is_skipped_with_a_warning(tmp_path):
    trainer = trainer_with(tmp_path, False)
    with pytest.warns(UserWarning, match="histogram 'h' has no finite values"):
        sink.log_histogram(trainer, "h", torch.tensor([math.nan, math.inf]), 0)
    assert not (tmp_path / "viz").exists()
    sink.log_histogram(trainer, "h2", torch.tensor([1.0, math.nan, 3.0]), 0)
    assert json.loads((tmp_path / "viz/h2/step0000000.json").read_text())["count"] == 2


LAZY_SCRIPT = textwrap.dedent("""
    import sys
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from convlens.callbacks import FilterEvolution
    from convlens.datamodules.shapes import ShapesDataModule
    from convlens.models.lenet import LeNet
    from convlens.models.module import ClassifierModule

    torch.set_num_threads(1)
    root = sys.argv[1]
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=1,
                         logger=TensorBoardLogger(root), callbacks=[FilterEvolution(num_probe=2)],
                         enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ClassifierModule(LeNet(), optimizer=partial(torch.optim.SGD, lr=0.05)),
                datamodule=ShapesDataModule(n_train=128, n_test=64, val_size=64, batch_size=64))
    print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules} & {"wandb", "mlflow"}))
""")


def test_wandb_and_mlflow_are_not_imported_without_their_logger(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout[-2000:]
    assert "evolution/conv1" in read_events(tmp_path)["images"]  # the run did draw
