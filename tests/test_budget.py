"""The visualizations' time budget (callbacks/budget.py): a callback over its part of the budget
draws every k epochs (the smallest k that fits), says so once; an explicit every_n_epochs is kept
and only warned about; budget=None never spaces out.

Oracles: `spacing` on hand-computed cases; in a real fit with a drawing of known length (a sleep)
on epochs of known length, the epochs drawn (event-file steps) against the k `spacing` gives for
the measured times.
"""
from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convlens.callbacks import OcclusionSensitivity
from convlens.callbacks import budget as budget_lib
from convlens.errors import ConfigError
from convlens.events import read_events


def test_spacing_hand_computed(monkeypatch):
    monkeypatch.delenv("CONVLENS_BUDGET", raising=False)
    # 5% of a 100 s epoch shared by 2 callbacks: 2.5 s each
    assert budget_lib.spacing(2.4, 100.0, 0.05, 2) == 1
    assert budget_lib.spacing(2.6, 100.0, 0.05, 2) == 2
    assert budget_lib.spacing(10.0, 100.0, 0.05, 2) == 4
    assert budget_lib.spacing(803.0, 480.0, 0.05, 4) == 134  # VGG16's decoded filters after an 8-min epoch
    assert budget_lib.spacing(0.3, 3.0, 0.05, 4) == 8  # LeNet's deconv on a 3-s epoch: short, still spaced
    assert budget_lib.spacing(10.0, 100.0, None, 2) == 1
    monkeypatch.setenv("CONVLENS_BUDGET", "off")
    assert budget_lib.spacing(10.0, 100.0, 0.05, 2) == 1
    with pytest.raises(ConfigError, match="budget must be a share"):
        OcclusionSensitivity(budget=5)


class Slow(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        time.sleep(0.05)  # epochs of a known, steady length
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, callback, epochs=7):
    data = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2), batch_size=4)
    seen = {}
    original = budget_lib.spacing

    def spy(seconds, epoch_time, budget, callbacks):
        seen.setdefault("k", []).append(original(seconds, epoch_time, budget, callbacks))
        return seen["k"][-1]

    def slow_visualize(trainer, pl_module):
        time.sleep(0.1)
        callback.log_image(trainer, "occlusion/0", torch.zeros(1, 4, 4))

    callback.visualize = slow_visualize
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        import convlens.callbacks.base as base

        base.spacing, saved = spy, base.spacing
        try:
            pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", callbacks=[callback],
                       logger=TensorBoardLogger(tmp_path, name="tb", version=""), enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                       limit_val_batches=1).fit(Slow(), data, data)
        finally:
            base.spacing = saved
    drawn = sorted(read_events(tmp_path / "tb")["images"].get("occlusion/0", []))
    val = sorted(read_events(tmp_path / "tb")["scalars"]["val/acc"])
    said = [str(w.message) for w in record if str(w.message).startswith("OcclusionSensitivity took")]
    return drawn, val, seen.get("k", []), said


@pytest.fixture
def budget_on(monkeypatch):
    monkeypatch.delenv("CONVLENS_BUDGET", raising=False)


def test_a_callback_over_budget_draws_every_k_epochs_and_says_so_once(tmp_path, budget_on):
    # a 0.1 s drawing against epochs of about 0.2 s: 5% is about 0.01 s, so k is about 10
    callback = OcclusionSensitivity(budget=0.05)
    drawn, val, ks, said = fit(tmp_path, callback)
    assert ks[0] > 1 and drawn[0] == val[0]  # the first epoch draws (its cost is not known before)
    # the oracle: replay the schedule with the k measured at each drawing (a spacing only widens)
    expected, every, measured = [], 1, iter(ks)
    for epoch in range(len(val)):
        if (epoch + 1) % every == 0 or (every > 1 and epoch == len(val) - 1):  # and the last epoch
            expected.append(val[epoch])
            every = max(every, next(measured))
    assert drawn == expected and callback.every_n_epochs == every
    assert len(said) == 1 and f"every {ks[0]} epochs" in said[0]


def test_an_explicit_every_n_epochs_is_kept_and_warned_about(tmp_path, budget_on):
    callback = OcclusionSensitivity(budget=0.05, every_n_epochs=1)
    drawn, val, ks, said = fit(tmp_path, callback, epochs=3)
    assert callback.every_n_epochs == 1 and drawn == val
    assert len(said) == 1 and "every_n_epochs=1 was set, so it is kept" in said[0]


def test_no_budget_never_spaces_out(tmp_path, budget_on):
    callback = OcclusionSensitivity(budget=None)
    drawn, val, _, said = fit(tmp_path, callback, epochs=3)
    assert drawn == val and not said and callback.every_n_epochs == 1


def test_the_spacing_is_kept_in_the_checkpoint_state():
    callback = OcclusionSensitivity()
    callback.every_n_epochs = 6
    resumed = OcclusionSensitivity()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.every_n_epochs == 6
    explicit = OcclusionSensitivity(every_n_epochs=2)
    explicit.load_state_dict(callback.state_dict())
    assert explicit.every_n_epochs == 2  # the user's choice wins over a saved spacing
    assert not resumed._measured
    callback._estimate = 3.5  # a stopped drawing's estimate: the next deadline after a resume uses it
    resumed.load_state_dict(callback.state_dict())
    assert resumed._estimate == 3.5 and not resumed._measured
    callback._measured = True  # a whole drawing was timed: a resumed run's drawings have no deadline
    resumed.load_state_dict(callback.state_dict())
    assert resumed._measured


# -- the first drawing: pieces until its deadline ------------------------------------------------------

class Convs(Slow):
    """Three convs, epochs of a known length (Slow's 0.05 s a batch)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))


CONVS = ["0", "2", "4"]


def fit_pieces(tmp_path, callback, epochs=3, check=None):
    """Fit Convs with `callback`; returns ({tag: steps}, val steps, warnings about the budget)."""
    data = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 2), batch_size=4)
    if check is not None:  # a look at the model right after each drawing
        visualize = callback.visualize

        def checked(trainer, pl_module):
            visualize(trainer, pl_module)
            check(pl_module)
        callback.visualize = checked
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pl.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", callbacks=[callback],
                   logger=TensorBoardLogger(tmp_path, name="tb", version=""), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   limit_val_batches=1).fit(Convs(), data, data)
    events = read_events(tmp_path / "tb")
    said = [str(w.message) for w in record if "budget" in str(w.message)]
    return events["images"], sorted(events["scalars"]["val/acc"]), said


@pytest.fixture
def slow_decoding(monkeypatch):
    """Each layer's decoding sleeps 0.3 s: against epochs of about 0.25 s, 5% is about 0.01 s."""
    import convlens.callbacks.decoded as decoded

    original = decoded.decode_filters

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)
    monkeypatch.setattr(decoded, "decode_filters", slow)


def test_a_first_drawing_stops_at_its_deadline_and_says_what_it_left_out(tmp_path, budget_on, slow_decoding):
    from convlens.callbacks import DecodedFilters

    callback = DecodedFilters(compute_error=False)
    images, val, said = fit_pieces(tmp_path, callback)
    first, last = val[0], val[-1]
    # the first drawing: its first piece (always drawn), then its deadline has passed
    assert [layer for layer in CONVS if first in images.get(f"decoded/{layer}", [])] == ["0"]
    assert len(said) == 1 and "it drew 1 of 3 layers (0; left out: 2, 4)" in said[0], said
    # the estimated full cost (3 pieces of 0.3 s) spaces it out; the last epoch is drawn in full
    assert callback.every_n_epochs > len(val) and "draws in full every" in said[0]
    assert all(last in images[f"decoded/{layer}"] for layer in CONVS)
    text = read_text(tmp_path / "tb", "budget/decoded")
    assert list(text) == [first] and "left out: 2, 4" in text[first]


def test_pieces_dearer_than_the_first_are_stopped_in_later_drawings_too(tmp_path, budget_on, monkeypatch):
    """The first drawing's one piece says a whole drawing costs 3 x 0.05 s, but the later layers
    take 1 s each: the next drawing (the last epoch) gets the budget of the epochs since, or twice
    that estimate, and stops after one dear piece instead of drawing 2 s."""
    import convlens.callbacks.decoded as decoded
    from convlens.callbacks import DecodedFilters

    original, seconds = decoded.decode_filters, {"0": 0.05, "2": 1.0, "4": 1.0}

    def uneven(model, layer, *args, **kwargs):
        time.sleep(seconds[layer])
        return original(model, layer, *args, **kwargs)
    monkeypatch.setattr(decoded, "decode_filters", uneven)
    callback = DecodedFilters(compute_error=False)
    images, val, said = fit_pieces(tmp_path, callback)
    first, last = val[0], val[-1]
    assert images["decoded/0"] == [first, last] and images["decoded/2"] == [last]
    assert "decoded/4" not in images  # before, the last drawing was whole: 2.05 s
    text = read_text(tmp_path / "tb", "budget/decoded")
    assert sorted(text) == [first, last] and "left out: 4" in text[last] and "drawing had" in text[last]
    assert callback._estimate > 1.0 and not callback._measured  # 1.05 s for 2 of 3 layers


def test_chosen_layers_are_never_left_out(tmp_path, budget_on, slow_decoding):
    from convlens.callbacks import DecodedFilters

    callback = DecodedFilters(layers=CONVS, compute_error=False)
    images, val, said = fit_pieces(tmp_path, callback, epochs=1)
    assert all(images[f"decoded/{layer}"] == val for layer in CONVS)
    assert len(said) == 1 and "the layers were chosen, so all 3 layers were drawn" in said[0]


def test_no_budget_draws_the_first_epoch_in_full(tmp_path, slow_decoding):
    from convlens.callbacks import DecodedFilters

    images, val, said = fit_pieces(tmp_path, DecodedFilters(compute_error=False), epochs=1)  # CONVLENS_BUDGET=off
    assert all(images[f"decoded/{layer}"] == val for layer in CONVS) and not said


def test_pieces_stopped_early_leave_no_hook_or_mode_behind(tmp_path, budget_on, monkeypatch):
    from convlens.callbacks import DeconvProjection
    from convlens.viz.deconvnet import Recording

    original = Recording.project_many

    def slow(*args, **kwargs):  # each layer's projections sleep
        time.sleep(0.3)
        return original(*args, **kwargs)
    monkeypatch.setattr(Recording, "project_many", slow)
    seen = []

    def check(pl_module):
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                    for m in pl_module.modules())
        seen.append((hooks, pl_module.training, all(p.requires_grad for p in pl_module.parameters())))

    images, val, said = fit_pieces(tmp_path, DeconvProjection(deconv_max=False), epochs=1, check=check)
    assert [layer for layer in CONVS if images.get(f"deconv/{layer}")] == ["0"]
    assert "it drew 1 of 3 layers" in said[0]
    assert seen == [(0, True, True)]


class Sleep(nn.Module):
    """A forward that takes `seconds` (not part of a plain conv chain: occlusion runs the whole net)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def fit_occlusion(tmp_path, callback, forward_seconds=0.05):
    """`fit_pieces` on a net whose every forward takes `forward_seconds`; also returns the
    forwards' batch sizes during the drawing."""
    batches = []

    def record(trainer, pl_module):
        handle = pl_module.net.register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
        try:
            visualize(trainer, pl_module)
        finally:
            handle.remove()
    visualize, callback.visualize = callback.visualize, record
    slow = Sleep(0.0)
    original_convs = Convs.__init__

    def slow_convs(self):
        original_convs(self)
        self.net = nn.Sequential(slow, *self.net)
    Convs.__init__ = slow_convs
    slow.seconds = forward_seconds
    try:
        images, val, said = fit_pieces(tmp_path, callback, epochs=1)
    finally:
        Convs.__init__ = original_convs
    return images, val, said, batches


def test_occlusion_draws_rows_of_copies_until_the_deadline(tmp_path, budget_on):
    """8x8 images, patch 3, stride 2: 3 x 3 positions, a row of 3 copies a piece. The first drawing
    (deadline about 0.01 s) draws the first row of the first image, then stops; the map shows that
    row and says how many rows it has."""
    callback = OcclusionSensitivity(patch=3, stride=2)  # num_probe "auto": 2 classes here
    images, val, said, batches = fit_occlusion(tmp_path, callback)
    assert batches == [1, 3]  # the unoccluded image, then one row of copies
    assert sorted(images) == ["occlusion/0"]
    assert "it drew 1 of 6 occlusion rows (image 0 row 1; left out: image 0 row 2, image 0 row 3, " \
           "image 1 row 1" in said[0], said
    assert callback._estimate is not None and not callback._measured
    text = read_text(tmp_path / "tb", "budget/occlusion")
    assert "1 of 6 occlusion rows" in text[val[0]]


def test_occlusion_rows_chosen_by_number_are_all_drawn(tmp_path, budget_on):
    """num_probe=4 is a choice, even though "auto" also means 4: nothing is cut, the deadline is
    only reported; one forward per row of copies."""
    probe = (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    chosen = (OcclusionSensitivity(patch=3, stride=2, num_probe=2),
              OcclusionSensitivity(probe=probe, num_probe=None, patch=3, stride=2))
    for run, callback in enumerate(chosen):
        images, val, said, batches = fit_occlusion(tmp_path / str(run), callback, forward_seconds=0.02)
        n = len(callback.probe_images)
        assert n == (2, 4)[run] and batches == [1, 3, 3, 3] * n
        assert sorted(images) == [f"occlusion/{i}" for i in range(n)]
        assert f"the probe images were chosen, so all {3 * n} occlusion rows were drawn" in said[0], said


def test_num_probe_auto_is_the_only_number_the_budget_may_cut():
    assert OcclusionSensitivity().auto_probes and OcclusionSensitivity().num_probe == 4
    assert not OcclusionSensitivity(num_probe=4).auto_probes
    assert OcclusionSensitivity(num_probe=None).num_probe is None
    with pytest.raises(ConfigError, match=r'num_probe must be an int >= 1 .* or "auto"'):
        OcclusionSensitivity(num_probe="all")


def test_an_approximate_occlusion_draws_whole_probe_images_until_the_deadline(tmp_path, budget_on):
    """A drill-down is not cut into rows: its pieces are the probe images."""
    callback = OcclusionSensitivity(patch=3, stride=1, approximate="fast", check_every=0)
    images, val, said, batches = fit_occlusion(tmp_path, callback)
    assert sorted(images) == ["occlusion/0"]
    assert "it drew 1 of 2 probe images (0; left out: 1)" in said[0], said


def read_text(logdir, tag):
    """{step: text} of a text tag in the event files under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
        acc.Reload()
        if tag + "/text_summary" in acc.Tags().get("tensors", []):
            for event in acc.Tensors(tag + "/text_summary"):
                out[event.step] = event.tensor_proto.string_val[0].decode()
    return out


def test_a_projection_drawing_with_a_deadline_runs_the_net_only_as_far_as_it_draws():
    """deconv / evolution record their first layer alone when the drawing has a deadline: stopped
    after it, the deeper convs never ran; drawn in full, every recording equals the one-pass
    recording (`viz.deconvnet.record_layers` of every layer: the oracle)."""
    from convlens.callbacks import DeconvProjection
    from convlens.callbacks.budget import Drawing
    from convlens.viz.deconvnet import record_layers

    torch.manual_seed(0)
    net, images = Convs().net.eval(), torch.rand(2, 1, 8, 8)
    calls = []
    net[4].register_forward_hook(lambda *_: calls.append("4"))
    callback = DeconvProjection(layers=CONVS)
    callback._drawing = Drawing(deadline=time.perf_counter() - 1)  # passed: only the first piece runs
    drawn = list(callback.recordings_within_budget(net, images, explicit=False))
    assert [layer for layer, _ in drawn] == ["0"] and calls == []
    callback._drawing = Drawing(deadline=time.perf_counter() + 60)
    drawn = dict(callback.recordings_within_budget(net, images, explicit=False))
    assert list(drawn) == CONVS and calls == ["4"]  # the rest in one forward after the first layer's
    whole = record_layers(net, images, CONVS)
    for layer in CONVS:
        assert torch.equal(drawn[layer].maps, whole[layer].maps)
        assert torch.equal(drawn[layer].project(0, "switches"), whole[layer].project(0, "switches"))
