"""VQGAN training losses, written fresh after taming-transformers (vqperceptual.py, lpips.py, discriminator).

- `LPIPS`: VGG16 features + 5 learned 1x1 "lin" layers. Weights come ONLY from local files: a torchvision `vgg16`
  state dict (keys `features.N.*`; `classifier.*` is ignored) and the LPIPS lin file (taming's/lpips' `vgg.pth`,
  keys `linK.model.1.weight`). Nothing is downloaded.
- `NLayerDiscriminator` (alias `PatchGANDiscriminator`): pix2pix PatchGAN with BatchNorm, taming's `weights_init`.
- `hinge_d_loss`, `adaptive_generator_weight`.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import state_dict_mismatch

# torchvision's vgg16 `features`: conv channel plan, "M" = max-pool. Indices into the Sequential match torchvision.
_VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# LPIPS taps the ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = features[3], [8], [15], [22], [29].
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk whose state-dict keys (`features.N.weight/bias`) match torchvision's `vgg16`."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16_PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features[: _LPIPS_TAPS[-1] + 1]):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """1x1 conv to one channel; `model.1.weight` keys as in taming/lpips (index 0 is the dropout)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(in_channels, 1, kernel_size=1, bias=False))


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


def _load_state_file(path: str, what: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe or corrupt pickle: never fall back to full unpickling
        raise ValueError(f"{what}: cannot load {path} as a weights-only state dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} does not hold a state dict (got {type(state).__name__})")
    return state


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    problems = state_dict_mismatch(module.state_dict(), state)
    if problems:
        raise ValueError(f"{what}: {path} does not match: {problems}")
    module.load_state_dict(state, strict=True)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant, frozen. forward(x, y) -> [B,1,1,1]."""

    def __init__(self, vgg_path: str | None = None, lin_path: str | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList([NetLinLayer(c) for c in _LPIPS_CHANNELS])
        if vgg_path is not None:
            self.load_vgg(vgg_path)
        if lin_path is not None:
            self.load_lin(lin_path)
        self.requires_grad_(False)
        self.eval()

    def load_vgg(self, path: str) -> None:
        """Load a torchvision vgg16 state dict (its `classifier.*` keys are not used)."""
        state = {k: v for k, v in _load_state_file(path, "LPIPS vgg16 weights").items()
                 if not k.startswith("classifier.")}
        _strict_load(self.net, state, path, "LPIPS vgg16 weights")

    def load_lin(self, path: str) -> None:
        """Load the LPIPS lin layers (`lin0.model.1.weight` .. `lin4.model.1.weight`, as in taming's vgg.pth)."""
        raw = _load_state_file(path, "LPIPS lin weights")
        # Map taming's `linK.` prefix onto our ModuleList `lins.K.`; drop taming's scaling-layer buffers if present.
        state = {("lins." + k[3:]) if k.startswith("lin") else k: v for k, v in raw.items()
                 if not k.startswith(("scaling_layer.", "net."))}
        _strict_load(self.lins, {k[len("lins."):]: v for k, v in state.items()}, path, "LPIPS lin weights")

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: the lin dropout must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x = self.net((x - self.shift) / self.scale)
        feats_y = self.net((y - self.shift) / self.scale)
        total = 0.0
        for fx, fy, lin in zip(feats_x, feats_y, self.lins):
            diff = (_normalize_channels(fx) - _normalize_channels(fy)) ** 2
            total = total + lin.model(diff).mean(dim=(2, 3), keepdim=True)  # [B,1,1,1]
        return total


def weights_init(module: nn.Module) -> None:
    """taming's init: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): `n_layers` stride-2 convs, BatchNorm, LeakyReLU(0.2), 1-ch logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # [B,1,h',w'] patch logits


PatchGANDiscriminator = NLayerDiscriminator


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_generator_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              disc_weight: float = 1.0) -> torch.Tensor:
    """taming's balance: ||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, 1e4], detached, x disc_weight."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight
