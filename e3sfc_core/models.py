"""Model zoo: every network the experiments train, built deterministically from a seed.

All models obey one hard rule: **no buffers**. The whole model state must be the flat
parameter vector (see :mod:`e3sfc_core.tensors`), so BatchNorm is replaced by GroupNorm
everywhere and nothing keeps running statistics. There is no dropout either: the server
recomputes gradients on synthetic features and needs a deterministic forward pass.

Every factory takes ``(input_shape, n_classes)`` with ``input_shape = (C, H, W)``, e.g.
``(1, 8, 8)`` for scikit-learn digits, ``(1, 28, 28)`` for MNIST, ``(3, 32, 32)`` for CIFAR.
Small inputs (down to 8x8) work for every model: pooling is skipped once the feature map
is 1x1 and classifier sizes come from a dummy forward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]

MAX_GROUPS = 32
CONVNET_WIDTH = 128
CONVNET_DEPTH = 3
MLP_HIDDEN = 200
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
# Design-space parameters of RegNetX-200MF (Radosavovic et al., 2020, "Designing Network
# Design Spaces"): stage widths 24/56/152/368, depths 1/1/4/7, group width 8.
REGNETX_200MF: dict[str, float] = {
    "depth": 13,
    "w_0": 24,
    "w_a": 36.44,
    "w_m": 2.49,
    "group_width": 8,
}
SMALL_IMAGE_MAX = 32  # images this small get a CIFAR-style stem (3x3, stride 1, no maxpool)


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm stand-in for BatchNorm: buffer-free, and batch-size independent.

    Uses ``min(32, C)`` groups when that divides ``C``, else the largest common divisor,
    so any channel count is accepted (RegNet widths such as 24 or 56 included).
    """
    groups = min(MAX_GROUPS, num_channels)
    if num_channels % groups:
        groups = math.gcd(num_channels, groups)
    return nn.GroupNorm(groups, num_channels)


def _pool_or_skip(pool: Callable[[], nn.Module], size: int) -> tuple[nn.Module, int]:
    """A 2x2 pooling layer and the new spatial size, or identity once the map is 1x1."""
    if size <= 1:
        return nn.Identity(), size
    return pool(), size // 2


@torch.no_grad()
def _flat_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Size of the flattened feature map, measured by one dummy forward (no RNG used)."""
    was_training = features.training
    features.eval()
    out = features(torch.zeros(1, *input_shape))
    features.train(was_training)
    return int(out[0].numel())


def _check_shape(input_shape: tuple[int, ...], n_classes: int) -> tuple[int, int, int]:
    """Validate ``(C, H, W)`` and the class count once, for every factory."""
    bad_shape = f"input_shape must be (channels, height, width) > 0, got {input_shape}"
    if len(input_shape) != 3:
        raise ConfigError(bad_shape)
    c, h, w = (int(v) for v in input_shape)
    if min(c, h, w) < 1:
        raise ConfigError(bad_shape)
    if n_classes < 2:
        raise ConfigError(f"n_classes must be at least 2, got {n_classes}")
    return c, h, w


def _init_relu_conv(conv: nn.Conv2d) -> None:
    """He init as torchvision uses it, for the stem convs we swap in."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def mlp(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Two hidden layers of 200 (784-200-200-10 on MNIST, 199,210 weights)."""
    c, h, w = _check_shape(input_shape, n_classes)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(MLP_HIDDEN, n_classes),
    )


def convnet(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The FL/distillation-literature ConvNet: 3 x (conv3x3-128, norm, ReLU, avgpool2), linear.

    Unlike the reference code this accepts any channel count and tiny images: the linear
    head is sized from the actual feature map, and pooling stops at 1x1.
    """
    c, h, w = _check_shape(input_shape, n_classes)
    layers: list[nn.Module] = []
    in_ch, size = c, min(h, w)
    for _ in range(CONVNET_DEPTH):
        pool, size = _pool_or_skip(lambda: nn.AvgPool2d(2), size)
        layers += [
            nn.Conv2d(in_ch, CONVNET_WIDTH, kernel_size=3, padding=1),
            group_norm(CONVNET_WIDTH),
            nn.ReLU(),
            pool,
        ]
        in_ch = CONVNET_WIDTH
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_features(features, (c, h, w)), n_classes))


def lenet5(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """LeNet-5 (conv5-6, pool, conv5-16, pool, 120, 84, C) with ReLU and max pooling.

    Convs are zero-padded by 2 whenever the map would otherwise get too small, which gives
    the classic layouts on 32x32 (no padding) and 28x28 (padding on the first conv only)
    and still works on 8x8.
    """
    c, h, w = _check_shape(input_shape, n_classes)
    size = min(h, w)
    pad1 = 0 if size >= 32 else 2
    size = size + 2 * pad1 - 4
    pool1, size = _pool_or_skip(lambda: nn.MaxPool2d(2), size)
    pad2 = 0 if size >= 10 else 2
    size = size + 2 * pad2 - 4
    pool2, size = _pool_or_skip(lambda: nn.MaxPool2d(2), size)
    features = nn.Sequential(
        nn.Conv2d(c, 6, kernel_size=5, padding=pad1),
        nn.ReLU(),
        pool1,
        nn.Conv2d(6, 16, kernel_size=5, padding=pad2),
        nn.ReLU(),
        pool2,
        nn.Flatten(),
    )
    return nn.Sequential(
        features,
        nn.Linear(_flat_features(features, (c, h, w)), 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, n_classes),
    )


def vgg11(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """CIFAR-style VGG-11 with GroupNorm; max pools are skipped once the map is 1x1."""
    c, h, w = _check_shape(input_shape, n_classes)
    layers: list[nn.Module] = []
    in_ch, size = c, min(h, w)
    for item in VGG11_CFG:
        if item == "M":
            pool, size = _pool_or_skip(lambda: nn.MaxPool2d(2), size)
            layers.append(pool)
            continue
        out_ch = int(item)
        conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        layers += [conv, group_norm(out_ch), nn.ReLU()]
        in_ch = out_ch
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_features(features, (c, h, w)), n_classes))


def resnet18(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """torchvision ResNet-18 with GroupNorm; CIFAR stem (3x3/1, no maxpool) for small images."""
    import torchvision.models  # imported here: only the torchvision-based models need it

    c, h, w = _check_shape(input_shape, n_classes)
    model = torchvision.models.resnet18(weights=None, num_classes=n_classes, norm_layer=group_norm)
    if max(h, w) <= SMALL_IMAGE_MAX:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        _init_relu_conv(model.conv1)
    elif c != model.conv1.in_channels:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _init_relu_conv(model.conv1)
    return model


def regnetx_200mf(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """RegNetX-200MF on torchvision's ``RegNet`` class, GroupNorm, stride-1 stem if small.

    torchvision ships no 200MF builder (its smallest is 400MF), so the design-space
    parameters of the paper's 200MF model are passed to its generic ``RegNet`` class.
    """
    from torchvision.models.regnet import BlockParams, RegNet
    from torchvision.ops.misc import Conv2dNormActivation

    c, h, w = _check_shape(input_shape, n_classes)
    stride = 1 if max(h, w) <= SMALL_IMAGE_MAX else 2

    def stem(
        _width_in: int,
        width_out: int,
        norm_layer: Callable[..., nn.Module],
        activation_layer: Callable[..., nn.Module],
    ) -> nn.Module:
        # torchvision hard-codes 3 input channels; we take the real count instead.
        return Conv2dNormActivation(
            c,
            width_out,
            kernel_size=3,
            stride=stride,
            norm_layer=norm_layer,
            activation_layer=activation_layer,
        )

    params = BlockParams.from_init_params(**REGNETX_200MF)
    return RegNet(params, num_classes=n_classes, norm_layer=group_norm, stem_type=stem)


MODELS: dict[str, ModelFactory] = {
    "mlp": mlp,
    "convnet": convnet,
    "lenet5": lenet5,
    "resnet18": resnet18,
    "vgg11": vgg11,
    "regnetx_200mf": regnetx_200mf,
}


def build_model(name: str, input_shape: tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """Build ``MODELS[name]`` with weights that depend only on ``seed``.

    Construction runs on CPU inside a forked RNG so the caller's global RNG state is left
    untouched; the same seed gives bit-identical weights in every process. The model is
    returned as constructed (train mode, on CPU).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}") from None
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        model = factory(tuple(input_shape), int(n_classes))
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:  # someone registered e.g. a BatchNorm model: its state would not be flat
        raise ConfigError(f"model {name!r} has buffers {buffers}; models must have none")
    logger.debug(
        "built %s for %s/%d classes: %d weights",
        name,
        tuple(input_shape),
        n_classes,
        sum(p.numel() for p in model.parameters()),
    )
    return model
