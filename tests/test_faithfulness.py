"""viz/faithfulness.py (deletion / insertion, ROAD, randomization similarity, model randomization) and
the Faithfulness callback.

Oracles: a naive loop that builds every perturbed image pixel by pixel and forwards it alone (the
batched curves and ROAD must equal it); a linear model, logit = w.x on images of ones with a zero
baseline, where removing pixels in the order of w is optimal (checked against every order of a
2x3 image, and random and shuffled maps on a larger one); scipy.stats.spearmanr and
scikit-image's structural_similarity; Rong et al.'s own sparse linear system of the imputation,
set up as their code does and solved by scipy's sparse direct solver; scipy.ndimage's Gaussian
filter for the insertion baseline; identical maps (similarity 1) and independent random maps
(near 0); the model's modes, hooks and weights compared before and after every call, failing
ones included; the callback's logged scalars against the viz functions run on the same net.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import NetModule
from convlens.callbacks import Faithfulness
from convlens.errors import ConfigError, ConvlensError
from convlens.events import read_events
from convlens.viz.faithfulness import (EXPLANATIONS, FaithfulnessError, cascading_randomization, deletion_insertion,
                                       deletion_insertion_many, explanation_maps, gaussian_blur, gray_fill,
                                       noisy_linear_imputation, randomizable_layers, randomization_similarity,
                                       randomized_copy, reference_maps, road, road_many, spearman, ssim)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- models and data --------------------------------------------------------------------------------
def tiny_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, classes)).double().eval()


def images(n: int = 3, side: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class LinearScore(nn.Module):
    """Two classes: logit 0 = w.x, logit 1 = 0 (so p(class 0) = sigmoid(w.x), increasing in w.x)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.double())

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


# -- the naive oracles ------------------------------------------------------------------------------
def naive_order(relevance: torch.Tensor) -> list[int]:
    values = relevance.flatten().tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def p_target(model, image, target) -> float:
    with torch.no_grad():
        return float(model(image[None]).softmax(1)[0, target])


def naive_curves(model, x, relevance, targets, steps, delete_to, insert_into):
    """Each perturbed image built pixel by pixel and forwarded alone."""
    n, _, h, w = x.shape
    deletion, insertion = [], []
    for i in range(n):
        order = naive_order(relevance[i])
        d_curve, i_curve = [], []
        for k in range(steps + 1):
            count = math.floor(k * h * w / steps + 0.5)
            deleted, inserted = x[i].clone(), insert_into[i].clone()
            for j in order[:count]:
                y, xx = divmod(j, w)
                deleted[:, y, xx] = delete_to[i][:, y, xx]
                inserted[:, y, xx] = x[i][:, y, xx]
            d_curve.append(p_target(model, deleted, targets[i]))
            i_curve.append(p_target(model, inserted, targets[i]))
        deletion.append(d_curve)
        insertion.append(i_curve)
    return torch.tensor(deletion, dtype=torch.float64), torch.tensor(insertion, dtype=torch.float64)


def trapezoid_by_hand(curve: list[float]) -> float:
    steps = len(curve) - 1
    return sum((a + b) / 2 / steps for a, b in zip(curve, curve[1:]))


# -- deletion / insertion ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [1, 7, None])
def test_batched_curves_equal_a_pixel_by_pixel_loop(max_batch):
    net, x = tiny_cnn(), images()
    maps = {"signed": torch.randn(3, 6, 6, dtype=torch.float64),
            "ties": torch.randint(0, 3, (3, 6, 6)).double(),                 # many equal values: raster order
            "channels": torch.randn(3, 3, 6, 6, dtype=torch.float64),        # |.| summed over channels
            "low_res": torch.rand(3, 3, 3, dtype=torch.float64)}             # upsampled bilinearly
    delete_to = torch.full_like(x, 0.25)
    insert_into = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    targets = torch.tensor([0, 2, 1])
    curves = deletion_insertion_many(net, x, maps, targets, steps=5, deletion_baseline=0.25,
                                     insertion_baseline=insert_into, max_batch=max_batch)
    relevance = {"signed": maps["signed"], "ties": maps["ties"], "channels": maps["channels"].abs().sum(1),
                 "low_res": F.interpolate(maps["low_res"][:, None], size=(6, 6), mode="bilinear")[:, 0]}
    for name, c in curves.items():
        deletion, insertion = naive_curves(net, x, relevance[name], targets, 5, delete_to, insert_into)
        torch.testing.assert_close(c.deletion, deletion, rtol=0, atol=1e-12)
        torch.testing.assert_close(c.insertion, insertion, rtol=0, atol=1e-12)
        for i in range(3):
            assert c.deletion_auc[i].item() == pytest.approx(trapezoid_by_hand(deletion[i].tolist()), abs=1e-12)
            assert c.insertion_auc[i].item() == pytest.approx(trapezoid_by_hand(insertion[i].tolist()), abs=1e-12)
        torch.testing.assert_close(c.fractions, torch.linspace(0, 1, 6, dtype=torch.float64))
    # one map alone gives the same curves as among others
    alone = deletion_insertion(net, x, maps["ties"], targets, steps=5, deletion_baseline=0.25,
                               insertion_baseline=insert_into)
    torch.testing.assert_close(alone.deletion, curves["ties"].deletion, rtol=0, atol=1e-12)


def test_default_baselines_are_occlusions_gray_and_a_gaussian_blur():
    from scipy.ndimage import gaussian_filter

    net, x = tiny_cnn(), images(2, side=8)
    to_input = lambda p: (p - 0.4) / 0.2  # noqa: E731  a datamodule's normalization
    gray = gray_fill(x, to_input)
    assert torch.allclose(gray, torch.full_like(gray, 0.5))
    blurred = gaussian_filter(x.numpy(), sigma=(0, 0, 1, 1), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(gaussian_blur(x, 1.0).numpy(), blurred, atol=1e-12)
    targets = torch.tensor([1, 0])
    maps = torch.rand(2, 8, 8, dtype=torch.float64)
    default = deletion_insertion(net, x, maps, targets, steps=4, pixel_to_input=to_input)   # sigma: 8 / 16 -> 1
    explicit = deletion_insertion(net, x, maps, targets, steps=4, deletion_baseline=0.5,
                                  insertion_baseline=torch.from_numpy(blurred))
    torch.testing.assert_close(default.deletion, explicit.deletion, rtol=0, atol=1e-12)
    torch.testing.assert_close(default.insertion, explicit.insertion, rtol=0, atol=1e-12)


def test_on_a_linear_model_w_gives_the_best_deletion_auc_of_all_maps():
    """logit = w.x, images of ones, deleted pixels set to 0: after deleting any set of k pixels the
    logit is the sum of w over the others, lowest when the k largest w are gone. So the map w has the
    lowest deletion curve at every step (and the highest insertion curve): checked against every
    order of the 6 pixels of a 2x3 image, one pixel per step."""
    w = torch.tensor([[[0.9, -0.4, 0.1], [2.0, -1.3, 0.5]]], dtype=torch.float64)
    net, x = LinearScore(w), torch.ones(1, 1, 2, 3, dtype=torch.float64)
    orders = list(itertools.permutations(range(6)))
    maps = {}
    for order in orders:  # a map whose values rank the pixels in `order`
        m = torch.empty(6, dtype=torch.float64)
        m[list(order)] = torch.arange(6, 0, -1, dtype=torch.float64)
        maps[order] = m.view(1, 2, 3)
    maps["w"] = w
    curves = deletion_insertion_many(net, x, maps, 0, steps=6, deletion_baseline=0.0, insertion_baseline=0.0)
    deletion = torch.stack([c.deletion_auc[0] for c in curves.values()])
    insertion = torch.stack([c.insertion_auc[0] for c in curves.values()])
    assert curves["w"].deletion_auc[0] == pytest.approx(deletion.min().item(), abs=1e-15)
    assert curves["w"].insertion_auc[0] == pytest.approx(insertion.max().item(), abs=1e-15)
    best = tuple(int(j) for j in torch.argsort(-w.flatten()))
    assert curves[best].deletion_auc[0] == curves["w"].deletion_auc[0]
    # pointwise too: no order deletes faster at any step
    lowest = torch.stack([c.deletion[0] for c in curves.values()]).amin(0)
    torch.testing.assert_close(curves["w"].deletion[0], lowest, rtol=0, atol=1e-15)


def test_on_a_linear_model_a_shuffled_w_and_random_maps_are_worse():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64) * 0.3
    net, x = LinearScore(w[0]), torch.ones(1, 1, 8, 8, dtype=torch.float64)
    maps = {"w": w[0], "shuffled": w.flatten()[torch.randperm(64, generator=g)].view(1, 8, 8)}
    maps.update({f"random{i}": torch.rand(1, 8, 8, generator=g, dtype=torch.float64) for i in range(20)})
    curves = deletion_insertion_many(net, x, maps, 0, steps=16, deletion_baseline=0.0, insertion_baseline=0.0)
    best = curves["w"].deletion_auc[0]
    assert curves["shuffled"].deletion_auc[0] > best + 0.05
    assert all(c.deletion_auc[0] > best for name, c in curves.items() if name != "w")
    assert all(c.insertion_auc[0] < curves["w"].insertion_auc[0] for name, c in curves.items() if name != "w")


# -- ROAD -------------------------------------------------------------------------------------------
def rong_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Rong et al.'s NoisyLinearImputer without noise, as their code sets up the sparse system
    (road/imputations.py: one equation per removed pixel, known neighbours on the right-hand side,
    the weights of neighbours outside the image taken off the diagonal), solved by spsolve."""
    from scipy.sparse import csc_matrix, lil_matrix
    from scipy.sparse.linalg import spsolve

    weights = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
               ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]
    c, h, w = image.shape
    mask = (~removed).astype(float).flatten()   # their convention: 1 = kept, 0 = imputed
    flat = image.reshape(c, -1)
    indices = np.argwhere(mask == 0).flatten()
    to_var = np.zeros(len(mask), dtype=int)
    to_var[indices] = np.arange(len(indices))
    a = lil_matrix((len(indices), len(indices)))
    b = np.zeros((len(indices), c))
    total = np.ones(len(indices))
    for (dy, dx), weight in weights:
        rows, cols = indices // w + dy, indices % w + dx
        valid = (rows >= 0) & (cols >= 0) & (rows < h) & (cols < w)
        coords = indices + dy * w + dx
        ids = np.argwhere(valid).flatten()
        known = mask[coords[valid]] > 0.5
        b[ids[known], :] -= weight * flat[:, coords[valid][known]].T
        a[ids[~known], to_var[coords[valid][~known]]] = weight
        total[~valid] -= weight
    a[np.arange(len(indices)), np.arange(len(indices))] = -total
    solution = spsolve(csc_matrix(a), b).reshape(len(indices), c)
    out = flat.copy()
    out[:, indices] = solution.T
    return out.reshape(c, h, w)


def test_linear_imputation_solves_rong_et_als_sparse_system():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 9, 7, generator=g, dtype=torch.float64)
    removed = torch.zeros(5, 9, 7, dtype=torch.bool)
    removed[0] = torch.rand(9, 7, generator=g) < 0.3
    removed[1] = torch.rand(9, 7, generator=g) < 0.9                      # large connected holes
    removed[2, :4, :5] = True                                           # a corner block
    removed[3, 4, 3] = True                                             # one pixel
    removed[4, :, 0] = True                                             # a border column
    imputed = noisy_linear_imputation(x, removed, noise=0.0, tol=1e-13)
    for i in range(5):
        expected = rong_imputation(x[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(imputed[i].numpy(), expected, atol=1e-10)
    # every removed pixel is the weighted mean of its in-image neighbours (the defining equation)
    kernel = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)
    sums = F.conv2d(imputed.reshape(-1, 1, 9, 7), kernel.view(1, 1, 3, 3), padding=1).view_as(imputed)
    weights = F.conv2d(torch.ones(1, 1, 9, 7, dtype=torch.float64), kernel.view(1, 1, 3, 3), padding=1)
    torch.testing.assert_close((sums / weights)[removed[:, None].expand_as(x)], imputed[removed[:, None].expand_as(x)],
                               rtol=0, atol=1e-10)


def test_imputation_noise_is_seeded_per_image_and_kept_pixels_stay():
    x = images(2, side=5)
    removed = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    clean = noisy_linear_imputation(x, removed, noise=0.0, tol=1e-13)
    noisy = noisy_linear_imputation(x, removed, noise=0.3, seed=[11, 12], tol=1e-13)
    for i, s in enumerate([11, 12]):
        draw = torch.randn((3, 5, 5), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        mask = removed[i].expand(3, 5, 5)
        torch.testing.assert_close(noisy[i][mask], clean[i][mask] + 0.3 * draw[mask], rtol=0, atol=1e-10)
        assert torch.equal(noisy[i][~mask], x[i][~mask])
    everything = noisy_linear_imputation(x, torch.ones(2, 5, 5, dtype=torch.bool), noise=0.0)
    assert torch.equal(everything, torch.zeros_like(x))  # no kept neighbour: 0 (then the noise)


def test_road_equals_a_loop_of_single_imputations_and_forwards():
    net, x = tiny_cnn(), images(2)
    maps = {"a": torch.randn(2, 6, 6, dtype=torch.float64), "b": torch.randint(0, 2, (2, 3, 6, 6)).double()}
    targets = torch.tensor([2, 0])
    qs = (0.25, 0.5, 0.8)
    result = road_many(net, x, maps, targets, qs, noise=0.0, max_batch=3, tol=1e-13)
    for name, m in maps.items():
        relevance = m if m.dim() == 3 else m.abs().sum(1)
        for i in range(2):
            order = naive_order(relevance[i])
            for j, q in enumerate(qs):
                count = round(q * 36)
                for most_first, got in ((True, result[name].morf), (False, result[name].lerf)):
                    chosen = order[:count] if most_first else order[36 - count:]
                    removed = torch.zeros(1, 6, 6, dtype=torch.bool)
                    removed.view(1, -1)[0, chosen] = True
                    single = noisy_linear_imputation(x[i:i + 1], removed, noise=0.0, tol=1e-13)
                    assert got[i, j].item() == pytest.approx(p_target(net, single[0], targets[i]), abs=1e-10)
    # with noise: the same numbers however the copies are batched (up to the solver's tolerance)
    one = road(net, x, maps["a"], targets, qs, noise=0.05, seed=3, max_batch=1, tol=1e-13)
    many = road(net, x, maps["a"], targets, qs, noise=0.05, seed=3, max_batch=100, tol=1e-13)
    torch.testing.assert_close(one.morf, many.morf, rtol=0, atol=1e-10)
    torch.testing.assert_close(one.lerf, many.lerf, rtol=0, atol=1e-10)
    assert not torch.allclose(one.morf, road(net, x, maps["a"], targets, qs, noise=0.0).morf)


# -- similarity -------------------------------------------------------------------------------------
def test_spearman_equals_scipy_with_ties_and_nan_for_constant_maps():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (4, 60), generator=g).double()
    b = torch.randn(4, 60, generator=g, dtype=torch.float64).relu()      # ties at 0, as a ReLU'd map
    ours = spearman(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-12)
    assert torch.isnan(spearman(torch.ones(1, 10), torch.rand(1, 10)))[0]


def test_ssim_equals_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 20, 17, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(3, 20, 17, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0),
                                               abs=1e-12)


def test_randomization_similarity_is_one_for_identical_maps_and_near_zero_for_independent_ones():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 3, 48, 48, generator=g, dtype=torch.float64)
    same = randomization_similarity(a, a.clone())
    for measure in (same.spearman, same.spearman_abs, same.ssim):
        torch.testing.assert_close(measure, torch.ones(4, dtype=torch.float64))
    b = torch.randn(4, 3, 48, 48, generator=g, dtype=torch.float64)
    other = randomization_similarity(a, b)
    assert other.spearman.abs().max() < 0.06 and other.spearman_abs.abs().max() < 0.06
    assert other.ssim.abs().max() < 0.1
    # the measures as the paper defines them, with scipy and scikit-image
    sa, sb = a.sum(1), b.sum(1)
    aa, ab = a.abs().sum(1), b.abs().sum(1)
    unit = lambda m: (m - m.min()) / (m.max() - m.min())  # noqa: E731
    for i in range(4):
        assert other.spearman[i].item() == pytest.approx(spearmanr(sa[i].flatten(), sb[i].flatten()).statistic,
                                                         abs=1e-12)
        assert other.spearman_abs[i].item() == pytest.approx(
            spearmanr(aa[i].flatten(), ab[i].flatten()).statistic, abs=1e-12)
        assert other.ssim[i].item() == pytest.approx(
            structural_similarity(unit(aa[i]).numpy(), unit(ab[i]).numpy(), data_range=1.0), abs=1e-12)


# -- the model is left as it was --------------------------------------------------------------------
class Fragile(nn.Module):
    """A net with BatchNorm and Dropout, in a mix of modes, that fails on batches above `limit`."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        torch.manual_seed(0)
        self.limit = limit
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 3))

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError("batch too large for this test net")
        return self.head(self.features(x))


def state(net: nn.Module) -> dict:
    return {"training": {n: m.training for n, m in net.named_modules()},
            "grad": {n: p.requires_grad for n, p in net.named_parameters()},
            "tensors": {k: v.clone() for k, v in net.state_dict().items()}}


def assert_unchanged(net: nn.Module, before: dict) -> None:
    after = state(net)
    assert after["training"] == before["training"] and after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    for name, m in net.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{attr} left on {name or 'the net'}"


CALLS = {
    "deletion_insertion": lambda net, x: deletion_insertion(net, x, torch.rand(2, 6, 6), steps=3, max_batch=4),
    "road": lambda net, x: road(net, x, torch.rand(2, 6, 6), percentiles=[0.5], max_batch=4),
    "explanation_maps": lambda net, x: explanation_maps(net, x, None, EXPLANATIONS, layer="features.4"),
    "randomized_copy": lambda net, x: randomized_copy(net),
    "cascading_randomization": lambda net, x: list(cascading_randomization(
        net, lambda twin: explanation_maps(twin, x, 0, ["gradcam"], layer="features.4"), x)),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_the_model_is_left_in_its_modes_without_hooks_after_every_call(call):
    net = Fragile()
    net.train()
    net.features[1].eval()  # a mix: the user's own choice of modes must survive
    x = torch.randn(2, 3, 6, 6)
    before = state(net)
    CALLS[call](net, x)
    assert_unchanged(net, before)


@pytest.mark.parametrize("call", ["deletion_insertion", "road", "explanation_maps"])
def test_the_model_is_left_as_it_was_after_a_failing_call(call):
    net = Fragile(limit=2)  # the batches of perturbed copies (4) make it raise mid-way
    net.train()
    net.features[3].eval()
    x = torch.randn(2, 3, 6, 6)
    before = state(net)
    with pytest.raises(RuntimeError, match="batch too large"):
        {"deletion_insertion": CALLS["deletion_insertion"], "road": CALLS["road"],
         "explanation_maps": lambda n, i: explanation_maps(n, i, None, ["occlusion"], patch=3, stride=1)}[call](net, x)
    assert_unchanged(net, before)
    with pytest.raises(FaithfulnessError, match="one map per image"):
        deletion_insertion(net, x, torch.rand(3, 6, 6))
    with pytest.raises(FaithfulnessError, match=r"\[N, H, W\] or \[N, C, H, W\]"):
        road(net, x, torch.rand(2, 6))
    assert_unchanged(net, before)


def test_cascading_randomization_works_on_a_copy_from_the_top_down():
    net = Fragile().eval()
    with torch.no_grad():  # a "trained" BatchNorm, unlike the one reset_parameters() makes
        for t in (net.features[1].weight, net.features[1].bias, net.features[1].running_mean):
            t.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    before = state(net)
    seen = []

    def explain(twin):
        assert twin is not net
        seen.append({k: v.clone() for k, v in twin.state_dict().items()})
        return explanation_maps(twin, x, 0, ["gradcam", "guided_backprop"], layer="features.4")

    steps = list(cascading_randomization(net, explain, x, seed=1))
    assert_unchanged(net, before)
    assert [layer for layer, _ in steps] == ["head.1", "features.4", "features.1", "features.0"]
    assert randomizable_layers(net) == ["features.0", "features.1", "features.4", "head.1"]
    original = before["tensors"]
    for k, (layer, maps) in enumerate(steps):  # the top k + 1 layers redrawn, the others the trained ones
        redrawn = {name for name, _ in steps[:k + 1]}
        for key, value in seen[k].items():
            changed = not torch.equal(value, original[key])
            if key.rsplit(".", 1)[0] in redrawn and key.endswith(("weight", "bias")):
                assert changed, (layer, key)
            elif key.rsplit(".", 1)[0] not in redrawn:
                assert not changed, (layer, key)
        assert set(maps) == {"gradcam", "guided_backprop"}
    # seeded: the same weights again
    again = randomized_copy(net, seed=4).state_dict()
    for k, v in randomized_copy(net, seed=4).state_dict().items():
        assert torch.equal(v, again[k])
    with pytest.raises(FaithfulnessError, match="cannot re-initialize"):
        randomized_copy(net, layers=["features.2"])


def test_reference_maps_are_seeded_noise_and_a_centred_bump():
    refs = reference_maps(2, 9, 7, seed=3)
    assert torch.equal(refs["random"], reference_maps(2, 9, 7, seed=3)["random"])
    assert not torch.equal(refs["random"], reference_maps(2, 9, 7, seed=4)["random"])
    centre = refs["centre"][0]
    assert centre.argmax().item() == 4 * 7 + 3 and torch.allclose(centre, centre.flip(0).flip(1))


# -- the callback -----------------------------------------------------------------------------------
CLASSES = 4


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, CLASSES))


Module = NetModule


def loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 16, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(16) % CLASSES), batch_size=8)


def fit(tmp_path, callback, epochs: int = 2, lr: float = 0.05, net=None):
    torch.manual_seed(0)
    net = net if net is not None else cnn()
    module = Module(net, lr)
    trainer = pl.Trainer(callbacks=[callback], max_epochs=epochs, limit_train_batches=2, limit_val_batches=1,
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         logger=TensorBoardLogger(tmp_path, name="tensorboard", version=""))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, loader(), loader(1))
    return module, trainer, [str(w.message) for w in record if str(w.message).startswith("Faithfulness")]


SMALL = dict(num_probe=2, steps=4, road_percentiles=[0.5])


def test_callback_logs_every_score_and_matches_the_viz_functions(tmp_path):
    from convlens.callbacks.faithfulness import final_scores

    torch.manual_seed(0)
    net = cnn()
    initial = copy.deepcopy(net)
    callback = Faithfulness(**SMALL)
    module, _, said = fit(tmp_path, callback, net=net)
    assert not [s for s in said if "switched off" in s], said
    events = read_events(tmp_path / "tensorboard")
    names = list(EXPLANATIONS) + ["random", "centre"]
    for name in names:
        for score in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
            assert events["scalars"][f"faithfulness/{name}/{score}"] == [1, 3], (name, score)
    for method in EXPLANATIONS:
        for measure in ("spearman", "spearman_abs", "ssim"):
            assert f"sanity/{method}/{measure}" in events["scalars"]
    assert "faithfulness/curves" in events["images"] and "viz_time/faithfulness" in events["scalars"]

    # the epoch-0 maps: those of the net as initialised, before any step
    images, labels = callback.probe_images, callback.probe_labels
    expected = explanation_maps(initial, images, labels, EXPLANATIONS, layer="3")
    assert callback.layer == "3"
    for method, maps in expected.items():
        torch.testing.assert_close(callback.reference_maps[method], maps.float(), rtol=1e-4, atol=1e-6)

    # the last epoch's scalars, read back, are the viz functions' on the trained net
    maps = explanation_maps(module.net, images, labels, EXPLANATIONS, layer="3")
    maps.update(reference_maps(2, 16, 16, 0))
    curves = deletion_insertion_many(module.net, images, maps, labels, steps=4)
    roads = road_many(module.net, images, maps, labels, [0.5])
    scores = final_scores(tmp_path)
    for name in names:
        assert scores[f"{name}/deletion_auc"] == pytest.approx(curves[name].deletion_auc.mean().item(), abs=1e-5)
        assert scores[f"{name}/insertion_auc"] == pytest.approx(curves[name].insertion_auc.mean().item(), abs=1e-5)
        assert scores[f"{name}/road_morf"] == pytest.approx(roads[name].morf.mean().item(), abs=1e-5)
    gradcam = randomization_similarity(maps["gradcam"].float(), callback.reference_maps["gradcam"])
    assert callback.history[-1]["sanity"]["gradcam"] == pytest.approx(
        gradcam.spearman_abs[torch.isfinite(gradcam.spearman_abs)].mean().item(), abs=1e-6)


def test_a_method_that_does_not_change_from_the_random_net_is_flagged_once(tmp_path):
    """lr=0: the net stays as initialised, so every map equals its epoch-0 map (similarity 1)."""
    callback = Faithfulness(sanity_warmup=2, **SMALL)
    _, _, said = fit(tmp_path, callback, epochs=4, lr=0.0)
    for method in EXPLANATIONS:
        flagged = [s for s in said if f"the {method} maps are still like" in s]
        assert len(flagged) == 1 and "after 2 epochs" in flagged[0], (method, said)
        assert "\n" not in flagged[0]
    assert callback.flagged == set(EXPLANATIONS)
    assert [h["epoch"] for h in callback.history] == [1, 2, 3, 4]
    assert all(h["sanity"][m] == pytest.approx(1.0) for h in callback.history for m in EXPLANATIONS)


def test_a_trained_net_is_not_flagged_when_its_maps_moved(tmp_path):
    callback = Faithfulness(sanity_warmup=1, sanity_threshold=1.0, **SMALL)  # only an unchanged map reaches 1
    _, _, said = fit(tmp_path, callback, epochs=2, lr=0.5)
    assert not [s for s in said if "still like" in s], said


def test_cascading_randomization_at_fit_end_leaves_the_users_net_untouched(tmp_path):
    torch.manual_seed(0)
    net = cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    callback = Faithfulness(cascading=True, methods=["gradcam", "deconv"], **SMALL)
    fit(tmp_path, callback, epochs=1, lr=0.0, net=net)  # lr=0: any change would be the cascade's
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, m in net.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, name
    assert [layer for layer, _ in callback.cascade] == ["7", "3", "0"]
    first = callback.cascade[0][1]
    assert first["deconv"]["spearman_abs"] == pytest.approx(1.0)   # the Linear redrawn: conv3's projection unchanged
    assert "faithfulness_cascade/similarity" in read_events(tmp_path / "tensorboard")["images"]


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    callback = Faithfulness(**SMALL)
    fit(tmp_path, callback, epochs=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    restored = Faithfulness(**SMALL)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.reference_maps.keys() == callback.reference_maps.keys()
    for method, maps in callback.reference_maps.items():
        assert torch.equal(restored.reference_maps[method], maps)
    assert restored.history == callback.history and restored.flagged == callback.flagged
    assert torch.equal(restored.probe_images, callback.probe_images)


def test_offline_validate_compares_with_a_randomized_copy(tmp_path):
    torch.manual_seed(0)
    net = cnn().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    callback = Faithfulness(**SMALL)
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
                         logger=TensorBoardLogger(tmp_path, name="tensorboard", version=""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(Module(net), loader(1))
    assert not callback.declined or callback.declined_reason is None
    assert callback.reference_maps is None and callback._offline_reference is not None
    twin = randomized_copy(net, seed=0)
    expected = explanation_maps(twin, callback.probe_images, callback.probe_labels, ["gradcam"], layer="3")
    torch.testing.assert_close(callback._offline_reference["gradcam"], expected["gradcam"], rtol=1e-4, atol=1e-6)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "sanity/gradcam/spearman_abs" in read_events(tmp_path / "tensorboard")["scalars"]


@pytest.mark.parametrize("options, message", [
    (dict(methods=["gradcam", "lime"]), "methods must name"),
    (dict(methods="gradcam"), "methods must be a list"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(road_percentiles=[0.5, 1.0]), "road_percentiles must be a list of fractions"),
    (dict(road_noise=-1), "road_noise must be a number >= 0"),
    (dict(blur_sigma=0), "blur_sigma must be a number > 0"),
    (dict(sanity_threshold=2), "sanity_threshold must be"),
    (dict(target="mine"), "Unknown target"),
    (dict(cascading="yes"), "cascading must be true or false"),
    (dict(stpes=3), "did you mean steps"),
])
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        Faithfulness(**options)
    assert "\n" not in str(error.value)


def test_without_a_layer_method_it_works_on_a_net_without_conv(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    callback = Faithfulness(methods=["occlusion", "guided_backprop"], **SMALL)
    fit(tmp_path, callback, epochs=1, net=net)
    assert not callback.declined
    assert "faithfulness/occlusion/deletion_auc" in read_events(tmp_path / "tensorboard")["scalars"]
    with pytest.raises(ConvlensError):
        Faithfulness(methods=[])


def test_final_scores_without_a_logger_come_from_the_scalars_file(tmp_path):
    from convlens.callbacks.faithfulness import final_scores

    callback = Faithfulness(methods=["gradcam"], **SMALL)
    torch.manual_seed(0)
    trainer = pl.Trainer(callbacks=[callback], max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(cnn()), loader(), loader(1))
    with open(tmp_path / "viz" / "scalars.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["tag"] == "faithfulness/gradcam/deletion_auc"]
    assert len(rows) == 2
    scores = final_scores(tmp_path)
    assert scores["gradcam/deletion_auc"] == pytest.approx(float(rows[-1]["value"]))
    assert callback.history[-1]["auc"]["gradcam"]["deletion_auc"] == pytest.approx(scores["gradcam/deletion_auc"])
    assert final_scores(tmp_path / "nothing") == {}


# -- the sweep summary ------------------------------------------------------------------------------
def test_sweep_summary_adds_each_models_final_scores(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from convlens.sweep_summary import summarize

    for job, (deletion, insertion) in {"a": (0.2, 0.7), "b": (0.4, 0.5)}.items():
        run = tmp_path / job
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("model:\n  c3: 1\n")
        (run / "metrics.json").write_text(json.dumps({"test/acc": 0.5, "val/acc_best": 0.5, "params": 10}))
        writer = SummaryWriter(str(run / "tensorboard"))
        for step, scale in ((1, 2.0), (3, 1.0)):  # the last step's value counts
            writer.add_scalar("faithfulness/gradcam/deletion_auc", deletion * scale, step)
            writer.add_scalar("faithfulness/gradcam/insertion_auc", insertion * scale, step)
        writer.close()
    summary = summarize(tmp_path, panels=False)
    with open(summary.files["csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["a"]["faithfulness/gradcam/deletion_auc"]) == pytest.approx(0.2)
    assert float(rows["b"]["faithfulness/gradcam/insertion_auc"]) == pytest.approx(0.5)
    md = summary.files["md"].read_text()
    assert "| a | 0.200 / 0.700 |" in md and "| b | 0.400 / 0.500 |" in md
