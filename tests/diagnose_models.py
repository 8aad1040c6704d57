"""Small reference models for the diagnosis tests (healthy ones and pathologies).

Widths 64–128 and batches 64 keep every audit well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

Init = Callable[[nn.Linear], None]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread.

    These models are tiny: on the shared 2-core machine, torch's thread pool
    fighting other processes made a 128x128 matmul ~100x slower (LSUV: 16 s
    with the default pool, 0.2 s with one thread).  Imported by the test
    modules, it applies to them only.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def kaiming(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)


def xavier(layer: nn.Linear) -> None:
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)


def normal(std: float) -> Init:
    def init(layer: nn.Linear) -> None:
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.zeros_(layer.bias)

    return init


def mlp(
    depth: int,
    *,
    width: int = 128,
    act: type[nn.Module] = nn.ReLU,
    init: Init | None = None,
    d_in: int = 64,
    d_out: int = 10,
    seed: int = 0,
) -> nn.Sequential:
    """``depth`` Linear layers with ``act`` between them (none after the last)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    model = nn.Sequential(*layers)
    if init is not None:
        for module in model:
            if isinstance(module, nn.Linear):
                init(module)
    return model


class Block(nn.Module):
    """A torchvision-style basic block: one in-place ReLU module called twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResNet(nn.Module):
    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


class Log(nn.Module):
    """log(x): NaN for every negative input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Sqrt(nn.Module):
    """sqrt(x) of a ReLU output: finite forward, but d sqrt/dx = inf at the zeros,
    and inf * 0 = NaN in the backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


class Attention(nn.Module):
    """Self-attention with separate query/key/value/output projections (BERT's layout)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.norm(x + self.out(weights @ v))


class SmallInitEncoder(nn.Module):
    """A BERT-like encoder initialised as BERT is (N(0, 0.02) weights): at init the
    query/key projections get gradients ~1e3x smaller than the residual stream,
    by construction (near-uniform attention), which is not vanishing."""

    def __init__(self, vocab: int = 200, d: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb_norm = nn.LayerNorm(d)
        self.layers = nn.Sequential(*[Attention(d) for _ in range(layers)])
        self.head = nn.Linear(d, 2)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.emb_norm(self.emb(ids)))
        return self.head(h[:, 0])  # classify from the first token, as BERT's [CLS]
