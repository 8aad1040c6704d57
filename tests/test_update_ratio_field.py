"""Update-ratio and optimizer verdicts from field trials.

* A parameter that is (near) zero by design at init (a layer scale, a zero gain, a
  zero-initialised position table or head) is judged against the norm its role
  gives it, not against its own tiny init (``gradscope.watching.update_ratio``):
  ‖Δw‖/‖w‖ of a 1e-5 layer scale under AdamW 1e-3 was 100, and a run was told to
  freeze its layer scales with lr 5e-06.
* A run that steps several optimizers, each given to ``scope.step`` in turn (a
  GAN), has every one audited and the update ratios of each one's layers sampled,
  whichever optimizer's step the cadence lands on.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.learning_rate import UPDATE_RATIO_HIGH
from gradscope.watching.update_ratio import UpdateRatios


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    logger = logging.getLogger("gradscope")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class LayerScale(nn.Module):
    """timm's ``LayerScale`` (CaiT, DeiT III): a per-channel gain initialised at 1e-5."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)
        self.ls = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls(self.fc2(self.act(self.fc1(self.norm(x)))))


def layer_scaled(d: int = 32, depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, d), *[Block(d) for _ in range(depth)], nn.LayerNorm(d), nn.Linear(d, 10))


class TinyGPT(nn.Module):
    """nanoGPT's layout: a learned position table ``nn.Parameter(torch.zeros(1, T, d))`` on the root."""

    def __init__(self, vocab: int = 50, d: int = 32, t: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, t, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.emb(idx) + self.pos[:, : idx.shape[1]])))


def step_zero_ratios(model: nn.Module, opt: torch.optim.Optimizer, loss_of: Any, steps: int = 2) -> dict[str, float]:
    """The update ratios of step 0 (Adam's first step moves every element by lr exactly)."""
    with gradscope.watch(model, every=1, on_finding=lambda f: None) as scope:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            scope.step(opt, loss=loss.detach())
            opt.step()
        ratios: dict[str, float] = {}
        for result in scope.recent:
            ratios.update(result.update_ratios.get(0, {}))
    return ratios


def update_ratio_findings(report: gradscope.Report) -> list[Any]:
    return [f for f in report.findings if f.code in ("update-ratio", "learning-rate-too-high")]


def mlp_loss(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


# -- parameters small by design ---------------------------------------------------------


@pytest.mark.parametrize("lr", [1e-3, 0.5])
def test_a_layer_scale_step_is_judged_against_its_identity_value(lr: float) -> None:
    """Adam's first step moves each element by lr: a 1e-5 gain's ratio is lr (against
    the identity gain 1), not lr / 1e-5 (100 at lr 1e-3); a far too high lr still shows."""
    model = layer_scaled()
    ratios = step_zero_ratios(model, torch.optim.Adam(model.parameters(), lr=lr), mlp_loss)
    for name in ("1.ls", "2.ls", "3.ls"):
        assert ratios[name] == pytest.approx(lr, rel=0.02)
    if lr > UPDATE_RATIO_HIGH:
        assert ratios["1.ls"] > UPDATE_RATIO_HIGH
    # an ordinary weight keeps its plain ratio: lr / rms(w)
    rms = float(model[1].fc1.weight.detach().pow(2).mean().sqrt())
    assert ratios["1.fc1"] > 0.5 * lr / (rms + lr)


def test_zero_initialised_table_and_head_are_judged_against_their_fan_in_scale() -> None:
    """A zero position table [1, T, d] and a zero-init head: their first step had no ratio
    at all (0 norm); it is lr against the LeCun scale 1/sqrt(fan_in)."""
    torch.manual_seed(0)
    model = TinyGPT()
    lr = 1e-3
    idx = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(2))

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(idx[:, :-1]).reshape(-1, 50), idx[:, 1:].reshape(-1))

    ratios = step_zero_ratios(model, torch.optim.Adam(model.parameters(), lr=lr), loss_of)
    assert ratios["model"] == pytest.approx(lr * math.sqrt(32), rel=0.05)  # the table: fan_in d = 32

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    nn.init.zeros_(mlp[2].weight)  # a zero-init head (torchvision's ViT)
    ratios = step_zero_ratios(mlp, torch.optim.Adam(mlp.parameters(), lr=lr), mlp_loss)
    assert ratios["2"] == pytest.approx(lr * math.sqrt(64), rel=0.05)  # fan_in 64


def test_a_layer_scaled_network_under_adamw_gets_no_update_ratio_finding() -> None:
    """CaiT / DeiT III recipe (AdamW 1e-3, gamma 1e-5): the layer scales were 'too large'
    (0.19 of their norm per step) with a fix that would freeze them (lr 5e-06)."""
    model = layer_scaled()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradscope.watch(model, every=1, on_finding=lambda f: None) as scope:
        for _ in range(20):
            opt.zero_grad()
            loss = mlp_loss(model)
            loss.backward()
            scope.step(opt, loss=loss.detach())
            opt.step()
    report = scope.report()
    assert update_ratio_findings(report) == []
    per_layer = report.analysis["training"]["update_ratio"]
    assert per_layer["1.ls"]["samples"] == 20
    assert 1e-4 < per_layer["1.ls"]["geometric_mean"] < 1e-2


def test_a_zero_position_table_with_the_nanogpt_recipe_gets_no_update_ratio_finding() -> None:
    """AdamW 6e-4, betas (0.9, 0.95), weight decay 0.1, warm-up, clip 1.0: the zero position
    table was 'layer 'model' changes by 0.1 ...' with a fix of lr 6e-06."""
    torch.manual_seed(0)
    model = TinyGPT()
    with torch.no_grad():
        model.emb.weight.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = torch.randint(0, 50, (30, 8, 17), generator=torch.Generator().manual_seed(3))
    with gradscope.watch(model, every=1, on_finding=lambda f: None) as scope:
        for d in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(d[:, :-1]).reshape(-1, 50), d[:, 1:].reshape(-1))
            loss.backward()
            scope.step(opt, loss=loss.detach())
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    report = scope.report()
    assert update_ratio_findings(report) == []
    assert report.analysis["training"]["update_ratio"]["model"]["samples"] == 30


def test_a_matrix_that_is_merely_small_at_init_is_still_judged_on_its_own_norm() -> None:
    """Only an exactly zero matrix or a small gain is small by design: a Linear drawn at
    std 1e-5 under Adam lr 1e-2 moves by ~1000x its norm per step, and is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.normal_(model[0].weight, std=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ratios = step_zero_ratios(model, opt, mlp_loss)
    assert ratios["0"] > 100


# -- several optimizers ---------------------------------------------------------------------


def gan_run(every: int, pairs: int = 40, g_opt: Any = None) -> tuple[gradscope.Report, Any]:
    """G: Adam with coupled L2 (a weight-decay warning); D: plain Adam; D then G each pair."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
    disc = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    model = nn.ModuleDict({"G": gen, "D": disc})
    opt_g = (g_opt or (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1)))(gen.parameters())
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    g = torch.Generator().manual_seed(4)
    with gradscope.watch(model, every=every, on_finding=lambda f: None) as scope:
        for _ in range(pairs):
            x, z = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
            d_loss = bce(disc(x), torch.ones(8, 1)) + bce(disc(gen(z).detach()), torch.zeros(8, 1))
            opt_d.zero_grad()
            d_loss.backward()
            scope.step(opt_d, loss=d_loss.detach())
            opt_d.step()
            g_loss = bce(disc(gen(z)), torch.ones(8, 1))
            opt_g.zero_grad()
            g_loss.backward()
            scope.step(opt_g, loss=g_loss.detach())
            opt_g.step()
    return scope.report(), scope


@pytest.mark.parametrize("every", [1, 11])
def test_every_optimizer_given_to_step_is_audited_and_keeps_its_findings(every: int) -> None:
    """every=1: the diagnosis steps (0, 10, 20 ...) all landed on D's steps, so G's coupled
    L2 was never seen; every=11: the audit flipped between them (8 appeared, 6 cleared)."""
    report, scope = gan_run(every)
    decay = [f for f in report.findings if f.code == "weight-decay"]
    assert any(f.severity.value == "warning" and f.layers[0].startswith("G.") for f in decay)
    assert scope._tracker.counts["cleared"] == 0
    audited = report.analysis["regularisation"]["optimizer"]["optimizers"]
    assert sorted(o["max_eta_lambda"] for o in audited) == [0.0, pytest.approx(1e-4)]


@pytest.mark.parametrize("every", [2, 4])
def test_each_optimizers_layers_get_update_ratios_whichever_step_is_sampled(every: int) -> None:
    """With D and G alternating and an even ``every`` every sampled step is D's: G's
    layers had 0 samples."""
    report, _ = gan_run(every)
    samples = {k: v["samples"] for k, v in report.analysis["training"]["update_ratio"].items()}
    expected = 80 // every
    assert samples == {"G.0": expected, "G.2": expected, "D.0": expected, "D.2": expected}


def test_the_update_ratio_fix_rebuilds_the_optimizer_of_the_layers_it_names() -> None:
    """G at an lr far too small (SGD 1e-7) beside a healthy Adam D, sampled on D's steps
    only: G is named, with SGD (its own optimizer) in the snippet."""
    report, _ = gan_run(2, g_opt=lambda p: torch.optim.SGD(p, lr=1e-7))
    (finding,) = [f for f in report.findings if f.code == "update-ratio"]
    assert set(finding.layers) == {"G.0", "G.2"}
    assert finding.evidence["optimizer"] == "torch.optim.SGD"
    assert "torch.optim.SGD(" in finding.fix.code and "Adam" not in finding.fix.code


def test_one_optimizer_takes_no_update_ratio_snapshot_on_unsampled_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer the optimizer does not hold (frozen, or left out) is never owed a snapshot
    by the same optimizer: unsampled steps stay free of snapshot work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05)  # model[0] is in no optimizer
    taken: list[int] = []
    original = UpdateRatios.take_snapshot

    def counting(self: UpdateRatios, step: int, *args: Any, **kwargs: Any) -> None:
        taken.append(step)
        original(self, step, *args, **kwargs)

    monkeypatch.setattr(UpdateRatios, "take_snapshot", counting)
    with gradscope.watch(model, every=4, on_finding=lambda f: None) as scope:
        for _ in range(12):
            opt.zero_grad()
            loss = mlp_loss(model)
            loss.backward()
            scope.step(opt)
            opt.step()
    assert taken == [0, 4, 8]
