"""A real TensorBoard server over a small sweep dir shows every job's run, the callbacks' images,
the summary run and one HParams row per job (read through its HTTP data API)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from omegaconf import OmegaConf

from convlens import sweep_summary
from conftest import compose_cfg
from test_sweep import SWEEP_ARGS, grid_net_params

JOB = SWEEP_ARGS  # the same tiny 2-layer-grid job as the sweep test
GRID = [(8, 4), (16, 4)]


def _make_sweep(sweep_dir):
    """Two grid jobs run by `train.run_job` into `<sweep>/c3=..,c4=..` (as the multirun would,
    with the job's config saved in `.hydra/`), then the sweep summary."""
    from convlens.train import run_job

    for c3, c4 in GRID:
        job_dir = sweep_dir / f"c3={c3},c4={c4}"
        cfg = compose_cfg(JOB + [f"model.c3={c3}", f"model.c4={c4}"], job_dir)
        (job_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), job_dir / ".hydra" / "config.yaml")
        assert run_job(cfg, multirun=True) is not None
    sweep_summary.summarize(sweep_dir, layers=["conv3"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_server_shows_runs_images_and_hparams(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _make_sweep(sweep_dir)
    job_runs = {f"c3={c3},c4={c4}/tensorboard" for c3, c4 in GRID}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = (tmp_path / "tensorboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "2"],
        stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline, runs = time.monotonic() + 120, []
        while time.monotonic() < deadline:  # the server starts, then loads the event files
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                runs = _get(f"{base}/data/runs")
            except (urllib.error.URLError, ConnectionError):
                runs = []
            if job_runs | {"summary"} <= set(runs):
                break
            time.sleep(1)
        assert job_runs | {"summary"} <= set(runs), (runs, (tmp_path / "tensorboard.log").read_text())

        plugins = _get(f"{base}/data/plugins_listing")
        assert plugins["images"]["enabled"] and plugins["hparams"]["enabled"]

        images = _get(f"{base}/data/plugin/images/tags")
        for run in job_runs:
            assert "deconv/conv3" in images[run], images.get(run)
        assert {"sweep/test_acc_vs_params", "sweep/deconv_conv3"} <= set(images["summary"])

        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"c3", "c4", "params", "lr", "batch_size", "max_epochs", "epochs", "model"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"hp/val_acc", "hp/test_acc", "hp/params"} <= metrics and "hp_metric" not in metrics

        groups = _get(f"{base}/data/plugin/hparams/session_groups",
                      {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                       "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
        rows = {}
        for group in groups["sessionGroups"]:
            (session,) = group["sessions"]
            values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
            rows[(int(group["hparams"]["c3"]), int(group["hparams"]["c4"]))] = values
        assert set(rows) == set(GRID)  # one row per job
        for (c3, c4), values in rows.items():
            assert values["hp/params"] == grid_net_params(c3, c4)
            metrics_json = json.loads((sweep_dir / f"c3={c3},c4={c4}" / "metrics.json").read_text())
            assert abs(values["hp/test_acc"] - metrics_json["test/acc"]) < 1e-6
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
