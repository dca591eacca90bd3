"""torchvision's VGG16 with a new head, for fine-tuning and for the report's VGG16 visualizations."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import VGG16_Weights, vgg16 as tv_vgg16

from convlens.checkpoints import WeightsError, load_state_checked, load_weight_file
from convlens.datamodules.base import cache_dir
from convlens.errors import ConfigError


def imagenet_weights_dir() -> Path:
    """Where the ImageNet weights are downloaded: `$CONVLENS_CACHE/hub/checkpoints` (like every
    download of convlens); a file torch.hub already has in its own folder is used from there."""
    name = Path(VGG16_Weights.IMAGENET1K_V1.url).name
    torch_hub = Path(torch.hub.get_dir()) / "checkpoints"
    ours = cache_dir() / "hub" / "checkpoints"
    return torch_hub if (torch_hub / name).is_file() and not (ours / name).is_file() else ours


class VGG16(nn.Module):
    """VGG16 (torchvision layout: `features.N`, `avgpool`, `classifier.N`) with a `num_classes` head.

    weights: "imagenet" (torchvision's download; needs the network once), a path to a local
    state-dict or checkpoint file, or None for random initialization. ReLUs are made non-in-place
    so forward hooks see every layer's output. Inputs smaller than 224 (32x32, 64x64) work: the
    adaptive average pool brings the last feature map to 7x7.
    """

    def __init__(self, num_classes: int = 10, weights: str | None = None, dropout: float = 0.5):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ConfigError(f"VGG16 dropout must be a probability in [0, 1), got {dropout}; set e.g. "
                              f"++model.net.dropout=0.5")
        net = tv_vgg16(weights=None, dropout=dropout)
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        for seq in (self.features, self.classifier):
            for i, m in enumerate(seq):
                if isinstance(m, nn.ReLU):
                    seq[i] = nn.ReLU(inplace=False)
        if weights is not None:
            state, source = self._weights_state(weights)
            head = state.get("classifier.6.weight")
            # load the file's own head first, so every key is checked; then swap it if needed
            self.classifier[6] = nn.Linear(4096, head.shape[0] if head is not None else num_classes)
            load_state_checked(self, state, source)
        if self.classifier[6].out_features != num_classes:
            self.classifier[6] = nn.Linear(4096, num_classes)

    @staticmethod
    def _weights_state(weights: str) -> tuple[dict, str]:
        if weights == "imagenet":
            model_dir = imagenet_weights_dir()
            try:
                state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False, model_dir=str(model_dir),
                                                                   weights_only=True)
            except Exception as e:  # offline: URLError, socket errors, ...
                raise WeightsError(
                    "Could not download torchvision's ImageNet VGG16 weights "
                    f"({VGG16_Weights.IMAGENET1K_V1.url}) into {model_dir}: {e}. Offline, download that file "
                    "elsewhere and put it there, or pass it as a local file: "
                    "model.weights=/path/to/vgg16-397923af.pth (or model.weights=null to train from scratch)."
                ) from e
            return state, "torchvision's IMAGENET1K_V1 weights"
        return load_weight_file(weights), str(weights)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
