"""LeNet exactly as MatConvNet's MNIST example, the net of Rafegas & Vanrell, "Understanding learned
CNN features through Filter Decoding with Substitution" (2015, arXiv:1511.05084).

conv 5x5 1->20, maxpool 2/2, conv 5x5 20->50, maxpool 2/2, conv 4x4 50->500, ReLU, conv 1x1 500->10.
There is deliberately no ReLU after conv1 or conv2: the paper's reconstruction errors (its Table 1)
depend on those layers being linear. 431,080 parameters; input 28x28, mean image subtracted
(the datamodule does that).
"""
from collections import OrderedDict

from torch import nn

from convlens.errors import ConfigError


class LeNet(nn.Sequential):
    """`init="matconvnet"` draws every weight from N(0, 0.01^2) and zeroes the biases, as
    MatConvNet's `cnn_mnist_init` (f = 1/100); `"pytorch"` keeps torch's default initialization."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, pool: str = "max", input_size: int = 28,
                 init: str = "pytorch"):
        if input_size != 28:
            raise ConfigError(f"LeNet is defined for 28x28 inputs (its conv4 is a 1x1 classifier over a 1x1 map), "
                              f"got input_size={input_size}; use model=cifar_convnet or resize the data to 28 "
                              f"(datamodule.image_size=28)")
        if pool not in ("max", "avg"):
            raise ConfigError(f"LeNet pool must be 'max' or 'avg', got {pool!r}; set model.net.pool=max or "
                              f"model.net.pool=avg")
        if init not in ("pytorch", "matconvnet"):
            raise ConfigError(f"LeNet init must be 'pytorch' or 'matconvnet', got {init!r}; set "
                              f"model.net.init=pytorch or model.net.init=matconvnet")
        Pool = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 20, 5),
                pool1=Pool(2, 2),
                conv2=nn.Conv2d(20, 50, 5),
                pool2=Pool(2, 2),
                conv3=nn.Conv2d(50, 500, 4),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(500, num_classes, 1),
                flatten=nn.Flatten(),
            )
        )
        if init == "matconvnet":
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.normal_(module.weight, std=0.01)
                    nn.init.zeros_(module.bias)
