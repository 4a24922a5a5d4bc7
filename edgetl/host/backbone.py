"""Pretrained backbones as PyTorch modules, split into a frozen feature extractor (image → pooled embedding) and a
classifier, the point where the device head attaches (as timm's ``forward_features`` / ``forward_head``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from edgetl.errors import RegistryError, WeightsError
from edgetl.registry import BackboneSpec, resolve_weights


class Backbone(nn.Module):
    """``features`` maps ``(N, 3, H, W)`` to a pooled ``(N, D)`` embedding; ``classifier`` maps it to logits."""

    def __init__(self, features: nn.Module, classifier: nn.Module, feature_dim: int, blocks: list[nn.Module]):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.feature_dim = feature_dim
        self._blocks = blocks  # ordered stages, last = closest to the embedding (for partial fine-tuning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def replace_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.feature_dim, num_classes)


class _Pooled(nn.Sequential):
    """A trunk followed by global average pooling and flattening."""

    def __init__(self, trunk: nn.Module):
        super().__init__(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


# ---------------------------------------------------------------------------------------------------------- MobileNetV2
def _mobilenet_v2(spec: BackboneSpec, state: dict[str, torch.Tensor] | None) -> Backbone:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None)
    if state is not None:
        model.load_state_dict(state, strict=True)
    linear = model.classifier[1]
    assert isinstance(linear, nn.Linear)
    features = _Pooled(model.features)
    return Backbone(features, linear, spec.feature_dim, list(model.features))


# ------------------------------------------------------------------------------------------------------ EfficientNet-Lite
# Stages of EfficientNet-Lite0: (kernel, stride, expansion, out channels, repeats); stem 32 and head 1280 stay fixed.
_LITE_STAGES = {
    "lite0": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
}
_BN = {"eps": 1e-3, "momentum": 0.01}


class _SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding (asymmetric for even totals), as the TF-trained weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # python ints: the input size is fixed per export, so the exported Pad is constant and folds into the Conv
        ih, iw = int(x.shape[-2]), int(x.shape[-1])
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite variant); attribute names match the weights file."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = _SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with the EfficientNet-PyTorch parameter names (``_conv_stem``, ``_blocks.N.…``, ``_fc``)."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in _LITE_STAGES:
            raise RegistryError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(_LITE_STAGES)}")
        self._conv_stem = _SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks: list[nn.Module] = []
        cin = 32
        for kernel, stride, expand, cout, repeats in _LITE_STAGES[variant]:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.trunk(x).mean((2, 3)))


class _LiteTrunk(nn.Module):
    def __init__(self, net: EfficientNetLite):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x)


def _efficientnet_lite(spec: BackboneSpec, state: dict[str, torch.Tensor] | None) -> Backbone:
    net = EfficientNetLite(spec.variant or "lite0", spec.num_classes)
    if state is not None:
        net.load_state_dict(state, strict=True)
    head = nn.Sequential(net._conv_head, net._bn1)
    return Backbone(_Pooled(_LiteTrunk(net)), net._fc, spec.feature_dim, [net._conv_stem, *net._blocks, head])


_BUILDERS: dict[str, Callable[[BackboneSpec, dict[str, torch.Tensor] | None], Backbone]] = {
    "torchvision.mobilenet_v2": _mobilenet_v2,
    "efficientnet_lite": _efficientnet_lite,
}


def load_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The verified pretrained state dict of ``spec`` (tensors only; ``weights_only`` loading, no pickle code)."""
    path = resolve_weights(spec)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise WeightsError(f"cannot load weights {path} ({exc}); reinstall them") from exc


def build_backbone(spec: BackboneSpec, pretrained: bool = True) -> Backbone:
    """Build the registry entry's network with its verified ImageNet weights (``pretrained=False``: random init,
    for unit tests only)."""
    if spec.architecture not in _BUILDERS:
        raise RegistryError(f"{spec.id}: unknown architecture {spec.architecture!r}; known: {', '.join(_BUILDERS)}")
    return _BUILDERS[spec.architecture](spec, load_state(spec) if pretrained else None).eval()


class MultiDepth(nn.Module):
    """A backbone's pooled embedding followed by the globally averaged outputs of some of its blocks, concatenated:
    ``(N, 3, H, W) → (N, D + Σ c_i)`` (Head2Toe-style features from every depth; the device head selects among them).

    Works on a copy of the backbone's feature extractor: forward hooks on the tapped blocks collect their outputs.
    """

    def __init__(self, backbone: Backbone, taps: Sequence[int]):
        super().__init__()
        import copy

        clone = copy.deepcopy(backbone)
        self.features = clone.features
        self._outputs: list[torch.Tensor] = []
        blocks = clone.blocks()
        if not taps or any(not 0 <= i < len(blocks) for i in taps):
            raise RegistryError(f"feature taps {list(taps)} must index the backbone's {len(blocks)} blocks")
        for i in taps:
            blocks[i].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._outputs.append(output.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._outputs = []
        last = self.features(x)
        return torch.cat([last, *self._outputs], dim=1)


def feature_groups(backbone: Backbone, spec: BackboneSpec, taps: Sequence[int], input_size: int
                   ) -> list[dict[str, Any]]:
    """The manifest's description of a multi-depth embedding: name, offset, size and layer of origin per group."""
    with torch.no_grad():
        sizes = [int(t.shape[1]) for t in _tap_outputs(backbone, taps, input_size)]
    groups = [{"name": "last", "offset": 0, "size": spec.feature_dim, "layer": "pooled final features"}]
    offset = spec.feature_dim
    for depth, (i, size) in enumerate(zip(taps, sizes), start=1):
        groups.append({"name": f"depth{depth}", "offset": offset, "size": size, "layer": f"block {i} (mean-pooled)"})
        offset += size
    return groups


def _tap_outputs(backbone: Backbone, taps: Sequence[int], input_size: int) -> list[torch.Tensor]:
    probe = MultiDepth(backbone, taps).eval()
    probe(torch.zeros(1, 3, input_size, input_size))
    return probe._outputs
