"""Faithfulness: every n epochs, can the explanation maps be trusted? Deletion / insertion, ROAD and
the model-randomization sanity check of each explanation method, as curves over training.

The measures are `viz.faithfulness` (see its docstring for the papers: Petsiuk et al.'s deletion and
insertion, BMVC 2018, arXiv:1806.07421; Rong et al.'s ROAD, ICML 2022, arXiv:2202.00449; Adebayo et
al.'s sanity checks, NeurIPS 2018, arXiv:1810.03292); the maps judged are those the other callbacks
draw, from the same `viz` functions (`viz.faithfulness.explanation_maps`): Grad-CAM, guided
backpropagation, guided Grad-CAM, occlusion and the deconvnet's projection of the top map.

Logged at the step of the epoch's validation scalars, for each enabled method `<m>` (`gradcam`,
`guided_backprop`, `guided_gradcam`, `occlusion`, `deconv`) and the reference maps `random` and
`centre` (which a real explanation should beat), averaged over the probe images:
- `faithfulness/<m>/deletion_auc` (lower: more faithful), `faithfulness/<m>/insertion_auc` (higher),
  `faithfulness/<m>/road_morf` (lower), `faithfulness/<m>/road_lerf` (higher);
- `sanity/<m>/spearman`, `.../spearman_abs`, `.../ssim`: the similarity of the method's
  maps now to its maps of the initialised net, computed at fit start before the first step and kept
  in the checkpoint (offline, `convlens-visualize`: to the maps of a copy of the net with every
  weight drawn again). A method whose `spearman_abs` stays at or above `sanity_threshold` after
  `sanity_warmup` epochs is flagged: one warning in the log, and "like the random net" in the figure;
- `faithfulness/curves`: a figure of the mean deletion and insertion curves of every method and
  reference this epoch, and each method's similarity to its random-net maps over the epochs so far.
With `cascading=True`, at fit end Adebayo et al.'s cascading randomization runs on a copy of the net
(the trained net is not touched): the weights are drawn again layer by layer from the top, and
`faithfulness_cascade/similarity` (a figure) and `faithfulness_cascade/table` (text) show how similar
each method's maps stay to the trained net's.

`final_scores(run_dir)` reads a run's last scores back (`convlens-sweep-summary` uses it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from convlens.callbacks import sink
from convlens.callbacks.base import VisualizationCallback
from convlens.callbacks.display import resolve_targets
from convlens.callbacks.lightning_compat import log_step
from convlens.callbacks.options import TARGETS, check_choice, check_int
from convlens.errors import ConfigError
from convlens.viz.deconvnet import layer_problems
from convlens.viz.faithfulness import (EXPLANATIONS, REFERENCES, cascading_randomization,
                                       deletion_insertion_many, explanation_maps, randomization_similarity,
                                       randomized_copy, reference_maps, road_many)
from convlens.viz.layers import layer_names, spatial_problems
from convlens.viz.saliency import default_saliency_layer

#: the methods that explain through a layer (Grad-CAM's maps, the deconvnet's top map)
LAYER_METHODS = ("gradcam", "guided_gradcam", "deconv")
#: the scores of `faithfulness/<m>/<score>`, and whether higher is more faithful
SCORES = {"deletion_auc": False, "insertion_auc": True, "road_morf": False, "road_lerf": True}


def _mean(values: torch.Tensor) -> float | None:
    """The mean of the finite values (None when there is none: e.g. Spearman of constant maps)."""
    values = values.double()
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


class Faithfulness(VisualizationCallback):
    """Deletion / insertion AUC, ROAD and the model-randomization sanity check of each explanation
    method on the probe images, every `every_n_epochs` epochs (see the module docstring).

    Args:
        layer: the layer of Grad-CAM and of the deconvnet's top map (None: the last Conv2d with maps
            larger than 1x1, as the saliency callback).
        methods: the explanation methods judged, some of gradcam, guided_backprop, guided_gradcam,
            occlusion, deconv.
        target: the class explained and scored: "true" (each image's label) or "predicted".
        steps: deletion / insertion steps (each step's perturbed copies are one batched forward).
        road_percentiles: the fractions of pixels ROAD removes, each in (0, 1).
        road_noise: standard deviation of the noise ROAD adds to imputed pixels (model input units).
        blur_sigma: the insertion baseline's Gaussian blur in pixels (None: 1/16 of the image side).
        patch, stride: the occlusion patch and stride (None: the occlusion callback's defaults).
        sanity_threshold: a method is flagged when the Spearman rank correlation of its absolute maps
            with those of the initialised net is at least this.
        sanity_warmup: epochs trained before a method can be flagged.
        cascading: at fit end, Adebayo et al.'s cascading randomization (on a copy of the net).
        max_batch: perturbed and occluded copies per forward (None: `viz.faithfulness.default_batch`).
        seed: the seed of the random reference map, of ROAD's noise and of re-drawn weights.
        every_n_epochs: see VisualizationCallback; probe options (probe, num_probe, probe_per_class,
            probe_seed, mean, std, batch_keys): see `ProbeSpec`.
    """

    name = "faithfulness"
    layer_kind = None  # Grad-CAM works on any layer with spatial maps
    state_key_options = ("layers", "methods")

    def __init__(self, layer: str | None = None, methods: Sequence[str] = EXPLANATIONS, target: str = "true",
                 steps: int = 20, road_percentiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                 road_noise: float = 0.01, blur_sigma: float | None = None, patch: int | None = None,
                 stride: int | None = None, sanity_threshold: float = 0.5, sanity_warmup: int = 3,
                 cascading: bool = False, max_batch: int | None = None, seed: int = 0, every_n_epochs: int = 1,
                 **probe_options):
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"layer must be one layer name (a string) or null, got {layer!r}")
        super().__init__(layers=[layer] if layer is not None else None, every_n_epochs=every_n_epochs,
                         **probe_options)
        if isinstance(methods, str) or not all(isinstance(m, str) for m in methods or ()):
            raise ConfigError(f"methods must be a list of method names, some of {', '.join(EXPLANATIONS)}; "
                              f"got {methods!r}")
        methods = tuple(methods)
        unknown = [m for m in methods if m not in EXPLANATIONS]
        if unknown or not methods or len(set(methods)) != len(methods):
            raise ConfigError(f"methods must name each of some of {', '.join(EXPLANATIONS)} once, got {list(methods)}")
        check_choice("target", target, TARGETS, " ('true': explain each image's label, 'predicted': its prediction)")
        check_int("steps", steps, 1, " (deletion / insertion steps)")
        if isinstance(road_percentiles, (str, bytes)) or not all(
                isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q < 1 for q in road_percentiles or ()) \
                or not road_percentiles:
            raise ConfigError(f"road_percentiles must be a list of fractions in (0, 1), e.g. [0.1, 0.5, 0.9], "
                              f"got {road_percentiles!r}")
        for option, value, low in (("road_noise", road_noise, 0), ("blur_sigma", blur_sigma, None)):
            if value is None and option == "blur_sigma":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value < 0 if low == 0 else value <= 0):
                raise ConfigError(f"{option} must be a number {'>= 0' if low == 0 else '> 0 (pixels) or null'}, "
                                  f"got {value!r}")
        for option, value in (("patch", patch), ("stride", stride), ("max_batch", max_batch)):
            if value is not None:
                check_int(option, value, 1, " (or null: the default)")
        if isinstance(sanity_threshold, bool) or not isinstance(sanity_threshold, (int, float)) \
                or not -1 <= sanity_threshold <= 1:
            raise ConfigError(f"sanity_threshold must be a rank correlation in [-1, 1], got {sanity_threshold!r}")
        check_int("sanity_warmup", sanity_warmup, 0, " (epochs)")
        if not isinstance(cascading, bool):
            raise ConfigError(f"cascading must be true or false, got {cascading!r}")
        check_int("seed", seed, 0)
        self.methods, self.target, self.steps = methods, target, steps
        self.road_percentiles = tuple(float(q) for q in road_percentiles)
        self.road_noise, self.blur_sigma = float(road_noise), blur_sigma
        self.patch, self.stride, self.max_batch, self.seed = patch, stride, max_batch, seed
        self.sanity_threshold, self.sanity_warmup = float(sanity_threshold), sanity_warmup
        self.cascading = cascading
        if not set(methods) & set(LAYER_METHODS):  # occlusion and guided backprop need no conv layer
            self.needs_layers, self.needs_conv = False, False
        #: each method's maps of the initialised net (CPU), computed at fit start, kept in the checkpoint
        self.reference_maps: dict[str, torch.Tensor] | None = None
        #: per drawn epoch: {"epoch", "auc": {name: {score: value}}, "sanity": {method: spearman_abs}}
        self.history: list[dict[str, Any]] = []
        #: the methods flagged as hardly changing from the random net
        self.flagged: set[str] = set()
        #: the last cascading randomization: [(layer re-initialized, {method: {measure: mean}})]
        self.cascade: list[tuple[str, dict[str, dict[str, float]]]] = []
        self._offline_reference: dict[str, torch.Tensor] | None = None

    @property
    def layer(self) -> str | None:
        return self.layers[0] if self.layers else None

    # -- layers (as the saliency callback) ---------------------------------------------------------
    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        if image is None:  # a placeholder until fit start, where one probe image tells which maps are spatial
            return layer_names(net, nn.Conv2d)[-1:]
        return [default_saliency_layer(net, image)]

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        problems = spatial_problems(net, image, layers, "; Grad-CAM and the deconvnet need a convolutional layer "
                                                        "(or its ReLU / pooling)")
        if "deconv" in self.methods:
            for layer, why in layer_problems(net, image, [x for x in layers if x not in problems])[1].items():
                problems[layer] = why
        return problems

    # -- the maps ----------------------------------------------------------------------------------
    def maps(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             normalization) -> dict[str, torch.Tensor]:
        """{method: map} of the enabled methods (`viz.faithfulness.explanation_maps`)."""
        return explanation_maps(net, images, targets, self.methods, self.layer, self.patch, self.stride,
                                pixel_to_input=normalization, max_batch=self.max_batch)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # offline, this runs at validation start, inside inference mode; the gradient methods need
        # ordinary tensors
        with torch.inference_mode(False):
            self._prepare_reference(trainer, pl_module)

    def _prepare_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        targets = resolve_targets(net, images, labels, self.target)
        normalization = self.normalization(trainer)
        if trainer.state.fn == "fit":
            if self.reference_maps is None:  # not restored from a checkpoint: the net as initialised
                maps = self.maps(net, images, targets, normalization)
                self.reference_maps = {m: v.detach().float().cpu() for m, v in maps.items()}
        elif self.reference_maps is None:  # offline, on a trained checkpoint: a copy with every weight redrawn
            twin = randomized_copy(net, seed=self.seed)
            self._offline_reference = {m: v.detach().float().cpu()
                                       for m, v in self.maps(twin, images, targets, normalization).items()}

    # -- each due epoch ----------------------------------------------------------------------------
    def visualize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        normalization = self.normalization(trainer)
        targets = resolve_targets(net, images, labels, self.target)
        maps = self.maps(net, images, targets, normalization)
        n, _, h, w = images.shape
        judged = {**maps, **reference_maps(n, h, w, self.seed, images.device, images.dtype)}
        curves = deletion_insertion_many(net, images, judged, targets, self.steps, pixel_to_input=normalization,
                                         blur_sigma=self.blur_sigma, max_batch=self.max_batch)
        roads = road_many(net, images, judged, targets, self.road_percentiles, self.road_noise, self.seed,
                          self.max_batch)
        scalars: dict[str, float] = {}
        auc: dict[str, dict[str, float]] = {}
        for name in judged:
            auc[name] = {"deletion_auc": float(curves[name].deletion_auc.mean()),
                         "insertion_auc": float(curves[name].insertion_auc.mean()),
                         "road_morf": float(roads[name].morf.mean()), "road_lerf": float(roads[name].lerf.mean())}
            scalars.update({f"faithfulness/{name}/{score}": value for score, value in auc[name].items()})

        offline = trainer.state.fn != "fit"
        reference = self.reference_maps if self.reference_maps is not None else self._offline_reference
        epochs = trainer.current_epoch + 1
        sanity: dict[str, float] = {}
        for method, m in maps.items():
            if reference is None or method not in reference or reference[method].shape != m.shape:
                continue
            similarity = randomization_similarity(m.detach().float().cpu(), reference[method])
            for measure in ("spearman", "spearman_abs", "ssim"):
                value = _mean(getattr(similarity, measure))
                if value is not None:
                    scalars[f"sanity/{method}/{measure}"] = value
            rho = _mean(similarity.spearman_abs)
            if rho is None:
                continue
            sanity[method] = rho
            if rho >= self.sanity_threshold and (offline or epochs >= self.sanity_warmup) \
                    and method not in self.flagged:
                self.flagged.add(method)
                against = "a copy of the net with random weights" if offline else "the initialised net"
                self._warn_once(f"{type(self).__name__}: the {method} maps are still like those of {against} "
                                f"(Spearman rank correlation of absolute maps {rho:.2f} >= sanity_threshold "
                                f"{self.sanity_threshold:g}{'' if offline else f' after {epochs} epochs'}): they "
                                "may show the image more than what the net learned (Adebayo et al. 2018)")
        self.history = [h for h in self.history if h["epoch"] != epochs] + [
            {"epoch": epochs, "auc": auc, "sanity": sanity}]
        self.log_scalars(trainer, scalars)
        self.log_image(trainer, f"{self.name}/curves", self.figure(curves, epochs, offline))

    # -- the figures -------------------------------------------------------------------------------
    def figure(self, curves, epoch: int, offline: bool = False) -> torch.Tensor:
        """[3, H, W] in [0, 1]: mean deletion and insertion curves of every map, and each method's
        similarity to its random-net maps over the epochs drawn so far."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), dpi=90)
        names = list(EXPLANATIONS) + list(REFERENCES)
        colors = {name: matplotlib.colormaps["tab10"](i % 10) for i, name in enumerate(names)}
        for name, c in curves.items():
            style = "--" if name in REFERENCES else "-"
            label = f"{name} (like the random net)" if name in self.flagged else name
            x = c.fractions.cpu().numpy()
            axes[0].plot(x, c.deletion.mean(0).cpu().numpy(), style, color=colors[name],
                         label=f"{label}: {float(c.deletion_auc.mean()):.3f}")
            axes[1].plot(x, c.insertion.mean(0).cpu().numpy(), style, color=colors[name],
                         label=f"{label}: {float(c.insertion_auc.mean()):.3f}")
        for ax, title in ((axes[0], "deletion (AUC: lower is more faithful)"),
                          (axes[1], "insertion (AUC: higher is more faithful)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("fraction of pixels perturbed, most relevant first", fontsize=8)
            ax.set_ylabel("p(target), mean over probe images", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
        ax = axes[2]
        for method in self.methods:
            points = [(h["epoch"], h["sanity"][method]) for h in self.history if method in h.get("sanity", {})]
            if points:
                label = f"{method} (like the random net)" if method in self.flagged else method
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colors[method], label=label,
                        markersize=3)
        ax.axhline(self.sanity_threshold, color="gray", lw=0.8, ls=":")
        against = "a net with random weights" if offline else "the initialised net"
        ax.set_title(f"similarity of the maps to those of {against}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Spearman of |map| (1: unchanged)", fontsize=8)
        ax.set_ylim(-0.2, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines[1:] or self.history:
            ax.legend(fontsize=6.5)
        fig.suptitle(f"faithfulness of the explanations, epoch {epoch}", fontsize=10)
        return self._render(fig)

    @staticmethod
    def _render(fig) -> torch.Tensor:
        import matplotlib.pyplot as plt
        import numpy as np

        fig.tight_layout()
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255

    # -- cascading randomization at fit end --------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.cascading and not self.declined and self.probe_images is not None and not trainer.fast_dev_run \
                and trainer.is_global_zero:
            with torch.inference_mode(False):
                self.run_cascade(trainer, pl_module)

    def run_cascade(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Adebayo et al.'s cascading randomization on a copy of the net; logs a figure and a table."""
        net = self.net(pl_module)
        images, labels = self.probe(pl_module)
        normalization = self.normalization(trainer)
        targets = resolve_targets(net, images, labels, self.target)
        trained = {m: v.detach().float().cpu() for m, v in self.maps(net, images, targets, normalization).items()}
        self.cascade = []
        for layer, maps in cascading_randomization(
                net, lambda twin: self.maps(twin, images, targets, normalization), images, seed=self.seed):
            row = {}
            for method, m in maps.items():
                similarity = randomization_similarity(m.detach().float().cpu(), trained[method])
                row[method] = {k: _mean(getattr(similarity, k)) for k in ("spearman", "spearman_abs", "ssim")}
            self.cascade.append((layer, row))
        if not self.cascade:
            return
        step = log_step(trainer)
        self.log_image(trainer, f"{self.name}_cascade/similarity", self.cascade_figure())
        head = "| layers re-initialized, from the top | " + " | ".join(self.methods) + " |"
        lines = [head, "|---|" + "---:|" * len(self.methods)]
        for layer, row in self.cascade:
            cells = [f"{row[m]['spearman_abs']:.2f}" if row[m]["spearman_abs"] is not None else ""
                     for m in self.methods]
            lines.append(f"| ... {layer} | " + " | ".join(cells) + " |")
        sink.log_text(trainer, f"{self.name}_cascade/table",
                      "Spearman rank correlation of absolute maps with the trained net's (Adebayo et al. 2018)\n\n"
                      + "\n".join(lines), step)

    def cascade_figure(self) -> torch.Tensor:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=90)
        layers = [layer for layer, _ in self.cascade]
        for i, method in enumerate(self.methods):
            for ax, measure in zip(axes, ("spearman_abs", "ssim")):
                values = [row[method][measure] for _, row in self.cascade]
                ax.plot(range(len(layers)), [v if v is not None else float("nan") for v in values], "o-",
                        color=matplotlib.colormaps["tab10"](i), label=method, markersize=3)
        for ax, title in zip(axes, ("Spearman rank correlation of |map|", "SSIM")):
            ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=6)
            ax.set_xlabel("re-initialized from the top down to", fontsize=8)
            ax.set_title(f"{title} with the trained net's maps", fontsize=9)
            ax.set_ylim(-0.2, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
        fig.suptitle("cascading randomization (Adebayo et al. 2018), on a copy of the net", fontsize=10)
        return self._render(fig)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"reference_maps": self.reference_maps, "history": self.history,
                      "flagged": sorted(self.flagged)})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.reference_maps = state_dict.pop("reference_maps", None)
        self.history = list(state_dict.pop("history", None) or [])
        self.flagged = set(state_dict.pop("flagged", None) or [])
        super().load_state_dict(state_dict)


# ------------------------------------------------------------------------------------------------
# A run's last scores, for the sweep summary
# ------------------------------------------------------------------------------------------------

def final_scores(run_dir: str | Path) -> dict[str, float]:
    """{"<method>/<score>": value} of the last step a run logged each `faithfulness/<method>/<score>`
    scalar at: from its TensorBoard event files (`<run_dir>/tensorboard`), else from the scalars file
    written without a logger (`<run_dir>/viz/scalars.csv`); {} when the run has none."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    last: dict[str, tuple[int, int, float]] = {}  # tag: (step, file order, value)
    for order, events in enumerate(sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))):
        try:
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
        except Exception:  # noqa: BLE001  a damaged event file: the others still count
            continue
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("faithfulness/"):
                for e in acc.Scalars(tag):
                    if (e.step, order) >= last.get(tag, (-1, -1, 0.0))[:2]:
                        last[tag] = (e.step, order, e.value)
    table = run_dir / "viz" / "scalars.csv"
    if not last and table.is_file():
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                tag = row.get("tag") or ""
                try:
                    step, value = int(row["step"]), float(row["value"])
                except (KeyError, TypeError, ValueError):
                    continue
                if tag.startswith("faithfulness/") and step >= last.get(tag, (-1, 0, 0.0))[0]:
                    last[tag] = (step, 0, value)
    return {tag[len("faithfulness/"):]: value for tag, (_, _, value) in sorted(last.items())}


def scores_markdown(scores: dict[str, dict[str, float]]) -> str:
    """A markdown table of `final_scores` per run ({run: scores}): one row per run, one column per
    method, each cell "deletion AUC / insertion AUC"; "" when no run has scores."""
    names = list(EXPLANATIONS) + list(REFERENCES)
    present = [m for m in names if any(f"{m}/deletion_auc" in s for s in scores.values())]
    if not present:
        return ""
    lines = ["| run | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for run, s in scores.items():
        cells = [f"{s[f'{m}/deletion_auc']:.3f} / {s[f'{m}/insertion_auc']:.3f}"
                 if f"{m}/deletion_auc" in s and f"{m}/insertion_auc" in s else "" for m in present]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
