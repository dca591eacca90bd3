"""The contract every `viz` entry point keeps, checked once for all of them.

For each entry point, on a small net whose submodules are in mixed train/eval modes, with some
parameters frozen and a user hook of its own:
- on success and on error (a failure injected inside the model's forward, after the method has set
  up its hooks, modes and flags), every submodule's mode, every parameter's `requires_grad`, the
  model's hooks, its weights and buffers (BatchNorm statistics) and its modules' attributes are as
  before;
- no parameter gradient is left behind (`.grad` stays None);
- it runs under `torch.no_grad()` and under `torch.inference_mode()` on inference-tensor images
  and gives what it gives outside (the oracle: the same call without them).

And for every `viz` module: it imports on its own (first, in an interpreter where no convlens
module is loaded yet), its convlens imports are at module level (an import inside a function can
hide an import cycle), and those imports form no cycle.

The method-specific assertions (equality with Captum, autograd, brute force) live in each method's
own test file; this file replaces their hand-written copies of these checks.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from convlens.viz import baselines, decoding, deconvnet, layers, occlusion, receptive_field, saliency, suppression
from convlens.viz import top_activations

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


class _Boom(Exception):
    pass


class Residual(nn.Module):
    """A net the chain paths refuse: a residual sum and a reused ReLU module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 5, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv1(x))))
        x = self.relu(self.conv2(x)) + x
        return self.head(self.conv3(x))


def chain_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), bn=nn.BatchNorm2d(6), relu1=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2), conv2=nn.Conv2d(6, 6, 3, padding=1), relu2=nn.ReLU(), conv3=nn.Conv2d(6, 5, 3),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(5, 4)))


NETS = {"chain": chain_net, "residual": Residual}

#: name -> (call(model, images), nets it applies to); every call uses layer conv2 (where the
#: failure is injected) or runs the whole net
ENTRY_POINTS = {
    "deconvnet.record+project_many": (
        lambda m, x: deconvnet.record(m, x, "conv2").project_many(torch.tensor([[0, 2]] * len(x))), NETS),
    "deconvnet.project": (lambda m, x: deconvnet.project(m, x, "conv2", 1), NETS),
    "deconvnet.project(fill)": (lambda m, x: deconvnet.project(m, x, "conv2", 1, unpool="fill"), NETS),
    "deconvnet.project_many": (lambda m, x: deconvnet.project_many(m, x, "conv2", torch.tensor([[0, 1]] * len(x))),
                               NETS),
    "deconvnet.top_units": (lambda m, x: deconvnet.top_units(m, x, "conv2", 2), NETS),
    "deconvnet.max_activating_images": (lambda m, x: deconvnet.max_activating_images(m, x, "conv2"), NETS),
    "deconvnet.record_layers+pairs": (
        lambda m, x: deconvnet.record_layers(m, x, ["conv1", "conv2"])["conv2"].project_pairs(
            torch.zeros(3, dtype=torch.long), torch.arange(3)), NETS),
    "decoding.decode_filters": (lambda m, x: decoding.decode_filters(m, "conv2"), {"chain": chain_net}),
    "decoding.reconstruction_error": (lambda m, x: torch.tensor(decoding.reconstruction_error(m, "conv2", x)),
                                      {"chain": chain_net}),
    "occlusion.occlusion_maps": (lambda m, x: occlusion.occlusion_maps(m, x, torch.zeros(len(x), dtype=torch.long),
                                                                       patch=4, stride=4), NETS),
    "receptive_field": (lambda m, x: receptive_field.receptive_field(m, x, "conv2").row_support, NETS),
    "receptive_field(general)": (
        lambda m, x: receptive_field.receptive_field(m, x, "conv2", path="general").col_support, NETS),
    "saliency.grad_cam": (lambda m, x: saliency.grad_cam(m, x, "conv2", 1), NETS),
    "saliency.guided_backprop": (lambda m, x: saliency.guided_backprop(m, x, 1), NETS),
    "saliency.guided_grad_cam": (lambda m, x: saliency.guided_grad_cam(m, x, "conv2", 1), NETS),
    "suppression.feature_maps": (lambda m, x: suppression.feature_maps(m, x, "conv2"), NETS),
    "suppression.interpret_kernel": (lambda m, x: suppression.interpret_kernel(m, x, "conv2", 1, steps=3)[0], NETS),
    "baselines.baseline_inputs(deconv)": (lambda m, x: baselines.baseline_inputs(m, x, "conv2", 1, "deconv"),
                                          {"chain": chain_net}),
    "baselines.baseline_inputs(guided_backprop)": (
        lambda m, x: baselines.baseline_inputs(m, x, "conv2", 1, "guided_backprop"), {"chain": chain_net}),
    "baselines.baseline_inputs(lrp)": (lambda m, x: baselines.baseline_inputs(m, x, "conv2", 1, "lrp"),
                                       {"chain": chain_net}),
    "top_activations.max_activations": (lambda m, x: top_activations.max_activations(m, x, "conv2")[0], NETS),
    "layers.layer_maxima": (lambda m, x: layers.layer_maxima(m, x, ["conv1", "conv2"])["conv2"], NETS),
}

CASES = [pytest.param(name, net, id=f"{name}-{net}") for name, (_, nets) in ENTRY_POINTS.items() for net in nets]


def prepared(net_name: str) -> nn.Module:
    torch.manual_seed(0)
    model = NETS[net_name]()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.running_mean.uniform_(-0.2, 0.2)
    model.train()
    model.conv3.eval()                     # mixed modes: each must come back as it was
    model.conv1.weight.requires_grad_(False)  # mixed flags
    model.conv1.register_forward_hook(lambda *a: None)  # a hook of the user's
    return model


def state(model: nn.Module):
    return ([(name, m.training) for name, m in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()],
            [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
              len(getattr(m, "_backward_pre_hooks", {}))) for name, m in model.named_modules()],
            [(name, sorted(vars(m))) for name, m in model.named_modules()],       # no attribute left on a module
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same(after, before, when: str) -> None:
    assert after[:4] == before[:4], when
    assert all(torch.equal(v, before[4][k]) for k, v in after[4].items()), f"weights or buffers changed {when}"


def as_tensors(out):
    if torch.is_tensor(out):
        return [out]
    return [t for t in out if torch.is_tensor(t)]


@pytest.mark.parametrize("name, net_name", CASES)
def test_state_is_restored_no_gradients_are_left_and_inference_mode_works(name, net_name):
    call = ENTRY_POINTS[name][0]
    model = prepared(net_name)
    images = torch.randn(3, 3, 12, 12)
    before = state(model)

    result = as_tensors(call(model, images))
    assert_same(state(model), before, "after a successful call")
    assert all(p.grad is None for p in model.parameters()), "a parameter gradient was left behind"

    # a failure inside the model's forward, once the method has set up its hooks, modes and flags
    def boom(*_):
        raise _Boom
    handle = model.conv2.register_forward_hook(boom)
    with pytest.raises(_Boom):
        call(model, images)
    handle.remove()
    assert_same(state(model), before, "after an error inside the forward")
    assert all(p.grad is None for p in model.parameters())

    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inside = as_tensors(call(model, images.clone()))
        assert_same(state(model), before, f"after a call under {context.__name__}")
        assert all(p.grad is None for p in model.parameters())
        assert len(inside) == len(result)
        for a, b in zip(inside, result):
            assert not a.requires_grad
            if name == "suppression.interpret_kernel":  # an optimization: the same steps, float noise apart
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# imports: every module on its own, at module level, no cycle
# ------------------------------------------------------------------------------------------

VIZ = Path(__file__).resolve().parents[1] / "viz"
MODULES = sorted(p.stem for p in VIZ.glob("*.py") if p.stem != "__init__")

# in one fresh interpreter (torch loaded once): before each module, every convlens module is
# dropped, so each is imported first, as `python -c "import convlens.viz.X"` would
_IMPORT_EACH_FIRST = """
import sys, traceback
import torch  # noqa: F401  (shared by all, as it would be loaded by any of them)
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "convlens" or m.startswith("convlens.")]:
        del sys.modules[loaded]
    try:
        __import__("convlens.viz." + name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_viz_module_imports_first_on_its_own():
    assert len(MODULES) > 5 and "deconvnet" in MODULES
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *MODULES], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"modules that fail when imported first:\n{r.stdout}{r.stderr[-2000:]}"


@pytest.mark.slow
def test_every_viz_module_imports_in_a_fresh_interpreter():
    """The same, one interpreter per module (`python -c "import convlens.viz.X"`), in parallel."""
    runs = {name: subprocess.Popen([sys.executable, "-c", f"import convlens.viz.{name}"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name in MODULES}
    failed = {}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed, failed


def _convlens_imports(tree: ast.AST):
    """(node, module name) of every import of a convlens module in `tree` (relative ones too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module == "convlens" or module.startswith("convlens."):
                yield node, module if not node.level else "." * node.level + module
                if module == "convlens.viz":  # from convlens.viz import occlusion_incremental
                    for alias in node.names:
                        yield node, f"convlens.viz.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "convlens" or alias.name.startswith("convlens."):
                    yield node, alias.name


@pytest.mark.parametrize("name", MODULES)
def test_convlens_imports_are_at_module_level(name):
    """An import inside a function can hide a cycle; in viz/ they are all at the top of the module."""
    tree = ast.parse((VIZ / f"{name}.py").read_text())
    top = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    hidden = [f"line {node.lineno}: {module}" for node, module in _convlens_imports(tree) if id(node) not in top]
    assert not hidden, f"viz/{name}.py imports convlens modules below module level: {hidden}"


def test_viz_imports_form_no_cycle():
    """The graph of viz modules importing each other (at module level) is acyclic."""
    edges = {}
    for name in MODULES:
        tree = ast.parse((VIZ / f"{name}.py").read_text())
        edges[name] = {module.rsplit(".", 1)[1] for _, module in _convlens_imports(tree)
                       if module.startswith("convlens.viz.") and module.rsplit(".", 1)[1] in MODULES}
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        path.append(node)
        for other in sorted(edges[node]):
            visit(other)
        path.pop()
        done.add(node)

    for name in MODULES:
        visit(name)
