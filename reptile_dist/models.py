"""The paper's networks. Batch norm always uses batch statistics (no running averages), as the
reference code does (training=True everywhere); this is also what makes transductive and
non-transductive evaluation differ, and lets torch.func.vmap batch tasks."""
from __future__ import annotations

import torch
from torch import nn


def conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    if pool:  # Mini-ImageNet net: 3x3 conv, BN, 2x2 max-pool, ReLU
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout, track_running_stats=False),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
    # Omniglot net: 3x3 conv with stride 2 ("same" padding), BN, ReLU
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1),
        nn.BatchNorm2d(cout, track_running_stats=False),
        nn.ReLU(),
    )


class OmniglotConv(nn.Module):
    """4 x [3x3 conv 64, stride 2, BN, ReLU] + linear: 113,221 parameters for 5 ways."""

    def __init__(self, ways: int, channels: int = 1, size: int = 28):
        super().__init__()
        self.features = nn.Sequential(*[conv_block(channels if i == 0 else 64, 64, pool=False) for i in range(4)])
        with torch.no_grad():
            flat = self.features(torch.zeros(2, channels, size, size)).flatten(1).shape[1]
        self.classifier = nn.Linear(flat, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MiniImageNetConv(nn.Module):
    """4 x [3x3 conv 32, BN, 2x2 max-pool, ReLU] + linear, for 84x84 RGB."""

    def __init__(self, ways: int, channels: int = 3, size: int = 84):
        super().__init__()
        self.features = nn.Sequential(*[conv_block(channels if i == 0 else 32, 32, pool=True) for i in range(4)])
        with torch.no_grad():
            flat = self.features(torch.zeros(2, channels, size, size)).flatten(1).shape[1]
        self.classifier = nn.Linear(flat, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class SineMLP(nn.Module):
    """1 -> 64 -> 64 -> 1 with tanh, as in the paper's sine-wave demonstration."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def glorot_init(model: nn.Module) -> nn.Module:
    """TensorFlow's layer defaults, which the reference code (tf.layers) used: Glorot-uniform
    weights and zero biases for conv and dense layers. PyTorch's defaults draw both from
    U(+-1/sqrt(fan_in)): 1.7x smaller conv weights and 2.4x smaller output weights for this net,
    which under batch norm and Adam changes the effective step size."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _image_shape(family, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the family's images (image families say it), else `default`."""
    return tuple(getattr(family, "input_shape", None) or default)


def _initialised(model: nn.Module, init: str) -> nn.Module:
    return glorot_init(model) if init == "glorot" else model


# The built-in networks, as plug-ins: factory(cfg, family=...) (config.BUILTIN_MODELS names them).
def omniglot_conv(cfg, family=None) -> nn.Module:
    channels, size, _ = _image_shape(family, (1, 28, 28))
    return _initialised(OmniglotConv(cfg.ways, channels, size), cfg.init)


def miniimagenet_conv(cfg, family=None) -> nn.Module:
    channels, size, _ = _image_shape(family, (3, 84, 84))
    return _initialised(MiniImageNetConv(cfg.ways, channels, size), cfg.init)


def sine_mlp(cfg, hidden: int = 64) -> nn.Module:
    return _initialised(SineMLP(hidden), cfg.init)
