"""The three reference models every gradscope benchmark measures.

MLP: 8 Linear(1024, 1024)+ReLU layers, batch 256.
CNN: 6 conv layers of 64 channels with BatchNorm and in-place ReLU, 32x32 inputs, batch 64.
Transformer: nn.TransformerEncoder, 4 layers, d_model 256, 4 heads, sequence 128, batch 16.

Two large models for the audit's peak memory (``benchmarks/memory.py --audit``):
ResNet-50: the standard bottleneck ResNet-50 (He et al. 2016, "Deep Residual
Learning", table 1: 3-4-6-3 bottleneck blocks, 25.6M parameters), written here
because torchvision's CPU wheel does not install beside torch 2.13; like
torchvision's, each block calls one ReLU module three times.
GPT-2: transformers' ``GPT2LMHeadModel(GPT2Config())``, 124M parameters, built
from its config (random weights, nothing downloaded).
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


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, channels_in: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(channels_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or channels_in != out:
            shortcut = nn.Conv2d(channels_in, out, 1, stride=stride, bias=False)
            self.downsample = nn.Sequential(shortcut, nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + identity)


class ResNet50(nn.Module):
    """Bottleneck ResNet-50 for 224x224 images (25,557,032 parameters, as torchvision's)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Module] = []
        channels = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers: list[nn.Module] = []
            for i in range(blocks):
                layers.append(_Bottleneck(channels, width, stride if i == 0 else 1))
                channels = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(batch: int = 32) -> Workload:
    model = ResNet50()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    return Workload(f"ResNet-50, 224x224, batch {batch}", model, lambda: (x, y), nn.functional.cross_entropy)


def gpt2(batch: int = 8, tokens: int = 512) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)

    def loss_fn(out: object, target: torch.Tensor) -> torch.Tensor:
        logits = out.logits  # type: ignore[attr-defined]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    return Workload(f"GPT-2 124M, {batch}x{tokens} tokens", model, lambda: (ids, ids), loss_fn)


WORKLOADS: dict[str, Callable[[], Workload]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
LARGE_WORKLOADS: dict[str, Callable[..., Workload]] = {"resnet50": resnet50, "gpt2": gpt2}
