"""Shared test fixtures: compose the real Hydra config, run `train(cfg)` in a tmp dir, read events; the
LightningModule the callback tests train (`NetModule`). Tests import it as `from conftest import ...`."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from convlens.config import compose_config
from convlens.events import read_events  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets"

class NetModule(pl.LightningModule):
    """The LightningModule of the callback tests: `net` (kept as the attribute `attr`, as a user's
    module keeps it), cross-entropy, plain SGD at `lr` (0: the net stays as built), `val/acc`."""

    def __init__(self, net: nn.Module, lr: float = 0.05, attr: str = "net"):
        super().__init__()
        self.lr, self._attr = lr, attr
        setattr(self, attr, net)

    def forward(self, x):
        return getattr(self, self._attr)(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


SMALL = {  # per method: small drawings, so tests that run every method stay fast; other options are the config's
    "deconv": ["callbacks.deconv.k=2", "callbacks.deconv.max_units=2"],
    "decoded": ["callbacks.decoded.max_units=2"],
    "occlusion": ["callbacks.occlusion.num_probe=1"],
    "saliency": ["callbacks.saliency.num_probe=2"],
    "suppression": ["callbacks.suppression.steps=2", "callbacks.suppression.num_probe=1",
                    "callbacks.suppression.top_k=1"],
    "top_activations": ["callbacks.top_activations.max_units=2", "callbacks.top_activations.k=2"],
    "evolution": [],
    "feature_viz": ["callbacks.feature_viz.steps=2", "callbacks.feature_viz.max_units=2"],
    "faithfulness": ["callbacks.faithfulness.num_probe=2", "callbacks.faithfulness.steps=4",
                     "callbacks.faithfulness.road_percentiles=[0.5]"],
    "dissection": ["callbacks.dissection.n=4", "callbacks.dissection.strip_units=2"],
    "mistakes": ["callbacks.mistakes.num_mistakes=2", "callbacks.mistakes.k=2", "callbacks.mistakes.num_suspects=2"],
}

# a tiny, fast shapes run: what most end-to-end tests start from
FAST_SHAPES = [
    "experiment=shapes_demo",
    "debug=default",          # CPU, no progress bar, no model summary
    "trainer.max_epochs=2",
    "datamodule.n_train=640",
    "datamodule.val_size=128",
    "datamodule.n_test=128",
]


def run_ddp_script(script: str, tmp_path: Path, stem: str) -> dict[int, object]:
    """Run a test's DDP script (argv: output dir, devices) with 2 ranks, then 1 process; each run
    saves `<stem><devices>.pt` from rank zero. Returns {devices: what it saved}."""
    import subprocess
    import sys

    path = tmp_path / f"ddp_{stem}.py"
    path.write_text(script)
    results = {}
    for devices in (2, 1):
        proc = subprocess.run([sys.executable, str(path), str(tmp_path), str(devices)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[devices] = torch.load(tmp_path / f"{stem}{devices}.pt", weights_only=True)
    return results


def compose_cfg(overrides: Sequence[str], output_dir: str | os.PathLike, config_name: str = "train") -> DictConfig:
    """The config `convlens-<config_name> <overrides>` would see, with its run dir at `output_dir`."""
    return compose_config(overrides, output_dir, config_name)


@pytest.fixture
def shared_data():
    """DATA_DIR with the real datasets, or skip with the reason."""
    root = Path(os.environ.get("DATA_DIR", SHARED_DATA))
    if not (root / "MNIST" / "raw").is_dir() and not (root / "cifar10-jpg").is_dir():
        pytest.skip(f"real datasets not found under {root} (set DATA_DIR=../shared/datasets)")
    return root


@pytest.fixture(autouse=True, scope="session")
def _no_time_budget():
    """Tests check what each epoch draws: the visualizations' time budget (which spaces slow ones
    out, callbacks/budget.py) is off, in module-scoped fixtures' fits and in subprocesses too, unless
    a test turns it on (tests/test_budget.py: `monkeypatch.delenv`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVLENS_BUDGET", "off")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches go to a per-session tmp dir unless CONVLENS_CACHE is set by the caller."""
    if "CONVLENS_CACHE" not in os.environ:
        monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Lightning answers a KeyboardInterrupt inside `fit` by ignoring SIGINT for the rest of the
    process; a test that does so in-process must not leave it that way, or later tests (and the
    subprocesses they start, which inherit an ignored signal) would no longer react to Ctrl-C."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one torch
    thread is as fast, and on a shared, loaded CPU two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests that change the machine (a tmpfs mounted, an immutable flag set: `root_faults`) run only
    when asked for by name, `-m root_faults` (as root, in a throwaway machine such as CI's)."""
    if "root_faults" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="changes the machine (mount/chattr as root): select with -m root_faults")
    for item in items:
        if item.get_closest_marker("root_faults"):
            item.add_marker(skip)
