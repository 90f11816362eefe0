"""MobileNetV2 adapted to C fluorescence channels and K perturbation classes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from cellmorph.checkpoint import LOAD_ERRORS
from cellmorph.config import ModelConfig
from cellmorph.errors import CellmorphError

BACKBONES = ("mobilenet_v2",)


class CellNet(nn.Module):
    """Backbone + pooled embedding + linear head; ``embed`` gives the penultimate features."""

    def __init__(self, features: nn.Module, embed_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = embed_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return self.head(emb), emb


def _adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A stem for C channels; pretrained RGB filters are reused, extra channels get their mean.

    Filters are rescaled by 3/C so that the summed response to a normalized input keeps the
    magnitude the pretrained BatchNorm expects.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        w = conv.weight  # (out, 3, k, k)
        mean = w.mean(dim=1, keepdim=True)
        reps = [w[:, i : i + 1] if i < w.shape[1] else mean for i in range(in_channels)]
        new.weight.copy_(torch.cat(reps, dim=1) * (w.shape[1] / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local torchvision state-dict file (never downloaded)."""
    p = Path(path)
    if not p.is_file():
        raise CellmorphError(f"model.pretrained: no such file {p} (weights are never downloaded)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:  # not weights: a bug keeps its traceback
        raise CellmorphError(f"model.pretrained: {p} is not a torch state dict ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    # The ImageNet head does not fit K classes; everything else must.
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise CellmorphError(
            f"model.pretrained: {p} does not match mobilenet_v2 "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> CellNet:
    """MobileNetV2 with its stem adapted to ``in_channels`` and its head to ``num_classes``."""
    if cfg.backbone not in BACKBONES:
        raise CellmorphError(
            f"model.backbone: unknown backbone {cfg.backbone!r}; known: {BACKBONES}"
        )
    if num_classes < 2:
        raise CellmorphError(f"need at least 2 classes to train, got {num_classes}")
    net = mobilenet_v2(weights=None, width_mult=cfg.width_mult)
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained)
    stem = net.features[0][0]
    if in_channels != stem.in_channels:
        net.features[0][0] = _adapt_stem(stem, in_channels)
    return CellNet(net.features, net.last_channel, num_classes, cfg.dropout)
