"""The three reference models every gradscope benchmark measures.

MLP: 8 Linear(1024, 1024)+ReLU layers, batch 256.
CNN: 6 conv layers of 64 channels with BatchNorm and in-place ReLU, 32x32 inputs, batch 64.
Transformer: nn.TransformerEncoder, 4 layers, d_model 256, 4 heads, sequence 128, batch 16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    model: nn.Module
    make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mlp() -> Workload:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(1024, 10))
    x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
    return Workload("MLP 8x1024, batch 256", model, lambda: (x, y), nn.functional.cross_entropy)


def cnn() -> Workload:
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(6):
        layers += [nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        channels = 64
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return Workload("CNN 6 conv x 64ch, 32x32, batch 64", model, lambda: (x, y), nn.functional.cross_entropy)


class _Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


def transformer() -> Workload:
    model = _Encoder()
    x, y = torch.randint(0, 1000, (16, 128)), torch.randint(0, 1000, (16, 128))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    return Workload("Transformer 4x256, 4 heads, seq 128, batch 16", model, lambda: (x, y), loss_fn)


WORKLOADS: dict[str, Callable[[], Workload]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
