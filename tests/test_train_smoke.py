from conftest import FAST_SHAPES, compose_cfg, read_events

from train import train


def test_shapes_demo_two_epochs_logs_scalars(tmp_path):
    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none"], tmp_path)
    metrics = train(cfg)
    events = read_events(tmp_path / "tensorboard")
    for tag in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"):
        assert tag in events["scalars"], f"{tag} missing: {sorted(events['scalars'])}"
    assert len(events["scalars"]["val/acc"]) == 2  # one per epoch
    assert (tmp_path / "metrics.json").is_file()
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["params"] == 431_080
