"""The CIFAR-10 nets: the grid-search net of the RecVis report and the blog's two-conv net."""
from collections import OrderedDict

from torch import nn

from convlens.errors import ConfigError


class CifarConvNet(nn.Sequential):
    """Grid net of Berthier & Mantoux, "Visualizing and Understanding Convolutional Neural Networks"
    (RecVis 2018 report; section 3, Fig. 6).

    conv1 32 3x3 same, ReLU, conv2 64 3x3 valid, ReLU, maxpool 2, BatchNorm, dropout .25,
    conv3 C3 3x3, ReLU, maxpool 2, dropout .25, conv4 C4 3x3, ReLU, maxpool 2, dropout .25,
    dense 1024, ReLU, dropout .5, dense 10. `c3` and `c4` are the grid axes.

    `init="keras"` initializes as the report's Keras code did by default: Glorot-uniform weights,
    zero biases, and BatchNorm with Keras's momentum 0.99 (0.01 in PyTorch's convention) and
    epsilon 1e-3; `"pytorch"` keeps torch's defaults.
    """

    def __init__(self, c3: int = 256, c4: int = 64, in_channels: int = 3, num_classes: int = 10,
                 input_size: int = 32, hidden: int = 1024, init: str = "pytorch"):
        if c3 < 1 or c4 < 1:
            raise ConfigError(f"c3 and c4 must be positive filter counts, got c3={c3}, c4={c4}; set e.g. "
                              f"model.c3=256 model.c4=64")
        if init not in ("pytorch", "keras"):
            raise ConfigError(f"CifarConvNet init must be 'pytorch' or 'keras', got {init!r}; set "
                              f"model.net.init=pytorch or model.net.init=keras")
        s = input_size            # conv1 keeps the size (same padding)
        s = (s - 2) // 2          # conv2 valid, pool
        s = (s - 2) // 2          # conv3 valid, pool
        s = (s - 2) // 2          # conv4 valid, pool
        if s < 1:
            raise ConfigError(f"input_size={input_size} is too small for CifarConvNet (needs >= 22); resize the "
                              f"images (datamodule.image_size=32) or use a smaller net")
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, 3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 64, 3),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                bn2=nn.BatchNorm2d(64),
                drop2=nn.Dropout(0.25),
                conv3=nn.Conv2d(64, c3, 3),
                relu3=nn.ReLU(),
                pool3=nn.MaxPool2d(2),
                drop3=nn.Dropout(0.25),
                conv4=nn.Conv2d(c3, c4, 3),
                relu4=nn.ReLU(),
                pool4=nn.MaxPool2d(2),
                drop4=nn.Dropout(0.25),
                flatten=nn.Flatten(),
                fc1=nn.Linear(c4 * s * s, hidden),
                relu5=nn.ReLU(),
                drop5=nn.Dropout(0.5),
                fc2=nn.Linear(hidden, num_classes),
            )
        )
        if init == "keras":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            self.bn2.momentum, self.bn2.eps = 0.01, 1e-3


class BlogConvNet(nn.Sequential):
    """The two-conv CIFAR-10 net of Frans, "Visualizing Features from a Convolutional Neural Network"
    (blog post, 2016): two convolutional layers (32 and 64
    filters), each with 2x2 max pooling and a ReLU, then a fully connected layer and softmax."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 kernel_size: int = 5):
        if kernel_size < 1 or kernel_size % 2 == 0:
            # "same" padding (kernel_size // 2) keeps the map size only for odd kernels
            raise ConfigError(f"BlogConvNet kernel_size must be an odd number >= 1, got {kernel_size}; "
                              f"set e.g. ++model.net.kernel_size=5")
        if input_size < 4:
            raise ConfigError(f"input_size={input_size} is too small for BlogConvNet (two 2x2 poolings need >= 4); "
                              f"resize the images (datamodule.image_size=32)")
        pad = kernel_size // 2
        s = input_size // 4
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, kernel_size, padding=pad),
                pool1=nn.MaxPool2d(2),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 64, kernel_size, padding=pad),
                pool2=nn.MaxPool2d(2),
                relu2=nn.ReLU(),
                flatten=nn.Flatten(),
                fc=nn.Linear(64 * s * s, num_classes),
            )
        )
