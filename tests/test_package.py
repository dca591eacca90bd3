"""One installed name: only `convlens` is importable, the config ships inside it, the console
scripts work from any directory, and a user's own `models`/`callbacks` packages do not clash."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
import textwrap

import pytest

from conftest import ROOT
from convlens.events import read_events
from convlens.methods import METHODS

PUBLIC = ["DeconvProjection", "FilterEvolution", "DecodedFilters", "OcclusionSensitivity", "Saliency",
          "TopActivations", "KernelSuppression", "UnitDissection", "Faithfulness", "FeatureVisualization",
          "Mistakes"]
TINY = ["experiment=shapes_demo", "debug=limit", "datamodule.n_train=256", "datamodule.val_size=64",
        "datamodule.n_test=64"]


def run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", ["models", "callbacks", "datamodules", "viz", "train", "visualize",
                                  "sweep_summary", "conf"])
def test_no_generic_top_level_names_are_installed(name, tmp_path):
    r = run([sys.executable, "-c", f"import {name}"], cwd=tmp_path)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout, r.stderr)


@pytest.mark.slow
def test_public_callbacks_at_the_package_root(tmp_path):
    code = f"from convlens.callbacks import {', '.join(PUBLIC)}; print('ok')"
    r = run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import convlens.callbacks as cb

    # the registry names each class, and every public class is a registered method's callback
    assert sorted(m.callback for m in METHODS.values()) == sorted(PUBLIC)
    assert all(getattr(cb, m.callback) is m.callback_class() for m in METHODS.values())


@pytest.mark.slow
def test_a_users_own_models_and_callbacks_packages_do_not_break_convlens(tmp_path):
    user = tmp_path / "project"
    for name in ("models", "callbacks", "datamodules", "viz"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    code = textwrap.dedent("""
        import models, callbacks, datamodules, viz
        import convlens.train, convlens.visualize, convlens.sweep_summary
        from convlens.callbacks import DeconvProjection
        from convlens.models.lenet import LeNet
        from convlens.viz import deconvnet
        from convlens.config import compose_config
        cfg = compose_config(["experiment=shapes_demo"])
        assert cfg.model.net._target_ == "convlens.models.lenet.LeNet", cfg.model.net._target_
        mine = (models.MINE, callbacks.MINE, datamodules.MINE, viz.MINE)
        assert mine == ("models", "callbacks", "datamodules", "viz"), mine
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(user))
    r = run([sys.executable, "-c", code], cwd=user, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_console_scripts_are_installed():
    for script in ("convlens-train", "convlens-visualize", "convlens-sweep-summary"):
        assert shutil.which(script), f"{script} not on PATH (pip install -e . installs it)"


@pytest.mark.slow
def test_convlens_train_from_another_directory_logs_images(tmp_path):
    out = tmp_path / "run"
    r = run(["convlens-train", *TINY, f"hydra.run.dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_events(out / "tensorboard")
    assert any(tag.startswith("deconv/") for tag in events["images"]), sorted(events["images"])
    assert (out / "metrics.json").is_file() and (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_plain_pip_install_into_a_fresh_venv(tmp_path):
    """Not editable: `pip install .` into a new venv (dependencies from this interpreter's
    site-packages, offline), then from an empty directory the console script trains and logs images,
    and only `convlens` is importable."""
    venv = tmp_path / "venv"
    r = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    # the dependencies: this interpreter's site-packages, whatever it is (the system's, or a venv's
    # own, whose packages the new venv's --system-site-packages does not see), after the venv's own
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    ours = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(purelib.stdout.strip()) / "convlens-test-deps.pth").write_text("\n".join(ours) + "\n")
    # copy the tree (no build dirs) so the build never writes into the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "logs", "outputs", "*.egg-info", "build",
                                                             "__pycache__", ".pytest_cache", "artifacts"))
    # the wheel is built by this interpreter's setuptools (the venv's bundled one may predate
    # bdist_wheel), then installed into the venv as a user's `pip install .` would install it
    wheels = tmp_path / "wheels"
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
             str(src)], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("convlens-*.whl")
    r = run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([str(py), "-c", "import convlens, convlens.conf; print(convlens.__file__)"], cwd=empty, env=env)
    assert where.returncode == 0 and str(venv) in where.stdout, (where.stdout, where.stderr)
    assert run([str(py), "-c", "import models"], cwd=empty, env=env).returncode != 0
    out = tmp_path / "run"
    r = run([str(venv / "bin" / "convlens-train"), *TINY, f"hydra.run.dir={out}"], cwd=empty, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(tag.startswith("deconv/") for tag in read_events(out / "tensorboard")["images"])


def test_no_callback_imports_another():
    """The callbacks share code through their rooms (base, options, probe, display, sink, budget,
    collect, projection, summary, ...), never by importing one another (nor the package, which
    imports them all)."""
    import ast

    callbacks = set(METHODS) | {"layout"}
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("convlens.callbacks"):
                names = [node.module.rsplit(".", 1)[-1]] if node.module != "convlens.callbacks" else \
                    [a.name for a in node.names]
                assert not (set(names) & callbacks) - {path.stem}, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.rsplit(".", 1)[-1] in callbacks - {path.stem} for a in node.names
                               if a.name.startswith("convlens.callbacks.")), path.name
