"""Every error that models/ and datamodules/ raise for a bad value is a ConvlensError, which the
entry points print as one line (`convlens: <Error>: what is wrong and what to do`), no traceback.

Oracles: the source itself (every `raise` in those packages, resolved to its class), and the
entry point's own printing (`exit_on_user_error`, and a `convlens-train` subprocess) on a config
with one bad value.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import os
import subprocess
import sys

import pytest

from conftest import FAST_SHAPES, ROOT, compose_cfg
from convlens.errors import ConvlensError, one_line, user_error

#: internal invariants: a bug if ever raised, so they keep their traceback
INTERNAL = (AssertionError, NotImplementedError)


def raised_classes():
    """(file, line, class) of every `raise X(...)` / `raise X` in models/ and datamodules/ whose X
    names a class (a call to a function that builds the error is checked through its return)."""
    for package in ("models", "datamodules"):
        for path in sorted((ROOT / package).glob("*.py")):
            module = importlib.import_module(f"convlens.{package}.{path.stem}")
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Raise) or node.exc is None:
                    continue
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name):
                    obj = getattr(module, target.id, getattr(builtins, target.id, None))
                    if isinstance(obj, type):
                        yield f"{package}/{path.name}", node.lineno, obj


def test_every_error_raised_by_models_and_datamodules_is_a_convlens_error():
    found = list(raised_classes())
    assert len(found) > 20  # the scan sees the raises (an empty scan would pass anything)
    bad = [(f, line, cls.__name__) for f, line, cls in found
           if not issubclass(cls, (ConvlensError, *INTERNAL))]
    assert not bad, f"raise a ConvlensError subclass (e.g. ConfigError) with a one-line message: {bad}"


def test_the_offline_help_is_a_convlens_error_with_a_neutral_example_path():
    from convlens.datamodules.mnist import _offline_help

    error = _offline_help("MNIST", ["/nowhere/MNIST/raw"], RuntimeError("download=false"), ("a", "b"))
    assert isinstance(error, ConvlensError)
    line = one_line(error)
    assert "\n" not in line and "DATA_DIR=/path/to/datasets" in line and "shared" not in line
    assert "experiment=shapes_demo" in line


BAD = [  # (override, what the line must say): at config time, at setup, and inside fit
    ("model.net.pool=maxx", "LeNet pool must be 'max' or 'avg', got 'maxx'; set model.net.pool=max"),
    ("model.net.init=xavier", "model.net.init=pytorch"),
    ("datamodule.batch_size=0", "datamodule.batch_size=64"),
    ("datamodule.n_train=0", "make_shapes: n must be an int >= 1"),
    ("datamodule.normalization=zscore", "Unknown normalization 'zscore'; use one of mean_image"),
    ("datamodule.val_size=100000", "set datamodule.val_size to a count between 1 and"),
    ("model.optimizer.lr=-1", "model.optimizer (SGD) refused its options: Invalid learning rate: -1"),
    ("datamodule.num_classes=7", "drop the datamodule.num_classes override"),
]


@pytest.mark.parametrize("override,needle", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_ends_with_one_line_on_stderr(override, needle, tmp_path, capsys):
    from convlens.train import exit_on_user_error, train

    cfg = compose_cfg(FAST_SHAPES + ["callbacks=none", "logger=none", override], tmp_path)
    with pytest.raises(Exception) as raised:
        train(cfg)
    known = user_error(raised.value)
    assert known is not None, f"not a ConvlensError: {raised.value!r}"
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(raised.value)
    assert exited.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"convlens: {type(known).__name__}: "), lines
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
def test_bad_pool_through_the_cli_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "experiment=shapes_demo", "callbacks=none", "logger=none",
                        "model.net.pool=maxx", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "Error executing job" not in out, out[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1] == ("convlens: ConfigError: LeNet pool must be 'max' or 'avg', got 'maxx'; "
                         "set model.net.pool=max or model.net.pool=avg"), lines[-3:]
