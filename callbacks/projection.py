"""What the callbacks that draw deconvnet projections (deconv, evolution) share: their default
layers and the deconvnet path (`viz.deconvnet.PATHS`) found for the net at fit start.
"""
from __future__ import annotations

import torch
from torch import nn

from convlens.callbacks.base import VisualizationCallback
from convlens.viz.deconvnet import Recording, layer_problems, record_layers
from convlens.viz.layers import default_conv_layers


class ProjectionCallback(VisualizationCallback):
    """The base of a callback that projects maps with the deconvnet: default layers
    `viz.layers.default_conv_layers`; the layers the deconvnet cannot record are found at fit start
    with one probe image (on every rank), which also fixes `_path` for the later drawings."""

    layer_kind = nn.Conv2d
    #: the deconvnet path for this net ("auto" until fit start)
    _path = "auto"

    def default_layers(self, net: nn.Module, image: torch.Tensor | None = None) -> list[str]:
        return default_conv_layers(net, image)

    def unusable_layers(self, net: nn.Module, image: torch.Tensor, layers) -> dict[str, str]:
        self._path, problems = layer_problems(net, image, layers)
        return problems

    def recordings_within_budget(self, net: nn.Module, images: torch.Tensor, explicit: bool):
        """(layer, `Recording`) for `self.layers` in order, as the time budget allows (a first
        drawing stops at its deadline, `within_budget`). All layers come from one forward pass; a
        drawing with a deadline records its first layer alone first (a forward that stops there),
        so a deep net's first piece does not pay for the forward through every layer."""
        recordings: dict[str, Recording] = {}
        split = self._drawing.deadline is not None and len(self.layers) > 1
        for i, layer in enumerate(self.within_budget(self.layers, "layers", explicit=explicit)):
            if layer not in recordings:
                wanted = self.layers[:1] if split and i == 0 else self.layers[i:]
                recordings.update(record_layers(net, images, wanted, self._path))
            yield layer, recordings[layer]
