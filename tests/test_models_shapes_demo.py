"""The offline demo's recipe (`experiment=shapes_demo`, its own epochs) trains a net that has learned
the shapes, so the pictures it draws show learned features.

Oracle: the test accuracy the run writes to its metrics.json, measured on the held-out test split
(generated from another seed than the training images).
"""
from __future__ import annotations

import json

import pytest

from conftest import compose_cfg


@pytest.mark.slow
def test_shapes_demo_reaches_90_percent_test_accuracy_in_its_default_epochs(tmp_path):
    from convlens.train import train

    # only the visualizations are off (they do not change training); epochs, data and recipe as shipped
    cfg = compose_cfg(["experiment=shapes_demo", "callbacks=none", "logger=none", "trainer.accelerator=cpu"],
                      tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == cfg.trainer.max_epochs
    assert metrics["test/acc"] >= 0.9, metrics
