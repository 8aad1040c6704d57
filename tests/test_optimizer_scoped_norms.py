"""A step's measurements belong to the optimizer being stepped (``scope.step(optimizer)``):
the global norm, spikes, AutoClip and the per-step non-finite check read the
parameters ``optimizer.step()`` applies, not every model parameter holding a ``.grad``.

The defect class: a GAN's D keeps the gradient of the G loss (G's optimizer never
applies it; D's ``zero_grad`` discards it), a frozen backbone keeps the gradient of
earlier training; both were counted in steps that do not apply them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import GradscopeError
from gradscope.watching.norms import PERCENTILE_RELATIVE_ERROR

REL = 1e-5  # float32 sums of squares in a different order than the hand norm


def _norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))


def _p10(values: list[float]) -> float:
    """Nearest-rank 10th percentile (gradscope.watching.norms.NormHistogram)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.1 * len(ordered))) - 1]


def _gan(iterations: int, spike_at: int | None = None, every: int = 1):
    """A DCGAN-style loop: D step then G step, each optimizer zeroing only its own
    gradients; one watch over both.  Returns (rows of (optimizer, own norm, all norm), report)."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
    disc = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    both = nn.ModuleDict({"G": gen, "D": disc})
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    rows = []
    with gradscope.watch(both, every=every, raise_on=()) as scope:
        for i in range(iterations):
            real = torch.randn(64, 2) * 0.5 + 1
            z = torch.randn(64, 16)
            opt_d.zero_grad()
            fake = gen(z).detach()
            loss_d = bce(disc(real), torch.ones(64, 1)) + bce(disc(fake), torch.zeros(64, 1))
            loss_d.backward()
            rows.append(("D", _norm(disc.parameters()), _norm(both.parameters())))
            scope.step(opt_d, loss=loss_d)
            opt_d.step()
            opt_g.zero_grad()
            loss_g = bce(disc(gen(z)), torch.ones(64, 1))
            if i == spike_at:
                loss_g = loss_g * 30  # a G-only gradient spike
            loss_g.backward()
            rows.append(("G", _norm(gen.parameters()), _norm(both.parameters())))
            scope.step(opt_g, loss=loss_g)
            opt_g.step()
    return rows, scope.report()


def test_gan_step_norm_is_the_stepping_optimizers_and_autoclip_is_per_optimizer() -> None:
    rows, report = _gan(24)
    training = report.analysis["training"]
    g_norms = [own for who, own, _ in rows if who == "G"]
    d_norms = [own for who, own, _ in rows if who == "D"]
    # D holds the G loss's gradient at each G step: the whole model's norm is ~6x G's own
    assert rows[-1][2] > 3 * rows[-1][1]
    assert training["global_grad_norm_last"] == pytest.approx(g_norms[-1], rel=REL)
    by_name = {o["optimizer"]: o for o in training["optimizers"]}
    assert set(by_name) == {"#0 Adam", "#1 Adam"}  # D stepped first
    d_own, g_own = by_name["#0 Adam"], by_name["#1 Adam"]
    assert d_own["global_grad_norm_last"] == pytest.approx(d_norms[-1], rel=REL)
    assert g_own["global_grad_norm_last"] == pytest.approx(g_norms[-1], rel=REL)
    assert g_own["global_grad_norm_max"] == pytest.approx(max(g_norms), rel=REL)
    assert d_own["steps_measured"] == g_own["steps_measured"] == 24
    # AutoClip from each optimizer's own norms (histogram bins: PERCENTILE_RELATIVE_ERROR)
    tol = PERCENTILE_RELATIVE_ERROR + 1e-6
    assert g_own["clip"]["threshold"] == pytest.approx(_p10(g_norms), rel=tol)
    assert d_own["clip"]["threshold"] == pytest.approx(_p10(d_norms), rel=tol)
    # no run-wide threshold drawn from two different quantities
    assert training["clip"] is None


def test_gan_generator_only_spike_is_found_at_its_own_norm_against_its_own_history() -> None:
    rows, report = _gan(40, spike_at=30)
    training = report.analysis["training"]
    spike_step = 2 * 30 + 1  # the G step of iteration 30
    g_before = [own for who, own, _ in rows[:spike_step] if who == "G"]
    assert rows[spike_step][1] > 20 * max(g_before)
    # the next (healthy) D step is no spike: the stale G gradient in .grad is not D's
    assert training["spike_steps"] == [spike_step]
    spikes = [f for f in report.findings if f.code == "gradient-spike"]
    assert len(spikes) == 1
    evidence = spikes[0].evidence
    assert evidence["global_norm"] == pytest.approx(rows[spike_step][1], rel=REL)  # 14.3, not 56.3 (G and D)
    assert evidence["optimizer"] == "#1 Adam"
    assert evidence["largest_parameter_norms"] and all(n.startswith("G.") for n in evidence["largest_parameter_norms"])
    assert "(optimizer #1 Adam)" in spikes[0].message
    # the recent median is G's (about 0.45), not a mixture with D's (about 2.2)
    assert evidence["recent_median"] == pytest.approx(sorted(g_before[-16:])[8], rel=0.1)
    # the fix clips G at G's AutoClip threshold
    g_norms = [own for who, own, _ in rows if who == "G"]
    assert evidence["clip_threshold"] == pytest.approx(_p10(g_norms), rel=PERCENTILE_RELATIVE_ERROR + 1e-6)
    assert {o["optimizer"]: o["spike_steps"] for o in training["optimizers"]} == {
        "#0 Adam": [],
        "#1 Adam": [spike_step],
    }


def _pretrained_then_frozen(head_only_optimizer: bool):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    head = nn.Linear(64, 10)
    model = nn.Sequential(backbone, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # pre-training leaves a gradient on every parameter
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 32)), torch.randint(0, 10, (32,))).backward()
        opt.step()
    for p in backbone.parameters():
        p.requires_grad_(False)  # .grad stays: nobody zeroes it
    params = head.parameters() if head_only_optimizer else model.parameters()
    return model, backbone, head, torch.optim.SGD(params, lr=0.05)


@pytest.mark.parametrize("every", [1, 5])
def test_frozen_backbone_stale_gradient_is_not_in_the_head_optimizers_norm(every: int) -> None:
    model, backbone, head, opt = _pretrained_then_frozen(head_only_optimizer=True)
    hand = []
    with gradscope.watch(model, every=every) as scope:
        for _ in range(10):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(torch.randn(32, 32)), torch.randint(0, 10, (32,)))
            loss.backward()
            hand.append((_norm(head.parameters()), _norm(model.parameters())))
            scope.step(opt, loss=loss)
            opt.step()
    training = scope.report().analysis["training"]
    assert hand[-1][1] > 1.2 * hand[-1][0]  # the stale backbone gradient would change the norm
    assert training["global_grad_norm_last"] == pytest.approx(hand[-1][0], rel=REL)
    assert training["global_grad_norm_max"] == pytest.approx(max(h for h, _ in hand), rel=REL)
    assert training["clip"]["threshold"] == pytest.approx(
        _p10([h for h, _ in hand]), rel=PERCENTILE_RELATIVE_ERROR + 1e-6
    )
    assert training["optimizers"] is None  # one optimizer: the run-level numbers are its
    assert not [n for n in scope.report().record.notes if "requires_grad=False" in n]  # not in the optimizer

    # The contrast: SGD applies a stale .grad of a requires_grad=False parameter it
    # holds; that update happens to the weights, so it is in the norm of the step.
    model, backbone, head, opt = _pretrained_then_frozen(head_only_optimizer=False)
    before = backbone[0].weight.detach().clone()
    with gradscope.watch(model, every=every) as scope:
        for p in head.parameters():
            p.grad = None
        loss = nn.functional.cross_entropy(model(torch.randn(32, 32)), torch.randint(0, 10, (32,)))
        loss.backward()
        everything = _norm(model.parameters())
        scope.step(opt, loss=loss)
        opt.step()
    assert not torch.equal(backbone[0].weight, before)  # the stale gradient was applied
    assert everything > 1.2 * _norm(head.parameters())
    report = scope.report()
    assert report.analysis["training"]["global_grad_norm_last"] == pytest.approx(everything, rel=REL)
    # said once, in the report's notes (not a finding: no code fits), naming a parameter
    stale = [n for n in report.record.notes if "requires_grad=False" in n]
    assert len(stale) == 1 and "4 parameter(s)" in stale[0] and "0.0.weight" in stale[0]


def _head_steps(model, head, opt, scope, steps: range, poison) -> None:
    for i in steps:
        if i == 1:
            poison()  # after step 0's full flush: the per-step check and the norm-only sampled steps read it
        for p in head.parameters():
            p.grad = None  # the backbone's stale gradient stays
        nn.functional.cross_entropy(model(torch.randn(32, 32)), torch.randint(0, 10, (32,))).backward()
        scope.step(opt)
        opt.step()


def test_a_stale_nonfinite_gradient_no_optimizer_applies_does_not_stop_the_run() -> None:
    """The per-step non-finite check reads what the step applies: a NaN left in a
    frozen backbone's .grad stops nothing the head's optimizer does (unsampled steps
    1-3, 5-7 and the sampled steps 4 and 8); the same NaN in a parameter the
    optimizer holds stops the run at that step, before optimizer.step()."""
    model, backbone, head, opt = _pretrained_then_frozen(head_only_optimizer=True)
    with gradscope.watch(model, every=4) as scope:
        _head_steps(model, head, opt, scope, range(9), lambda: backbone[0].weight.grad.fill_(float("nan")))
    assert scope.first_nonfinite is None
    assert math.isfinite(scope.report().analysis["training"]["global_grad_norm_last"])

    model, backbone, head, opt = _pretrained_then_frozen(head_only_optimizer=False)
    with pytest.raises(GradscopeError), gradscope.watch(model, every=4) as scope:
        _head_steps(model, head, opt, scope, range(9), lambda: backbone[0].weight.grad.fill_(float("nan")))
    assert scope.first_nonfinite is not None and scope.first_nonfinite["step"] == 1


def test_optimizer_scope_follows_add_param_group() -> None:
    """Progressive unfreezing: a group added to the optimizer joins the norm at its next
    step; before, the first layer's gradient left from pre-training is not in it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model(torch.randn(16, 8)).pow(2).mean().backward()  # pre-training leaves gradients everywhere
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.01)
    norms = []
    with gradscope.watch(model, every=1) as scope:
        for i in range(4):
            if i == 2:
                for p in model[0].parameters():
                    p.requires_grad_(True)
                opt.add_param_group({"params": list(model[0].parameters())})
            opt.zero_grad()  # the optimizer's parameters only
            model(torch.randn(16, 8)).pow(2).mean().backward()
            norms.append(_norm(p for group in opt.param_groups for p in group["params"]))
            scope.step(opt)
            opt.step()
            assert scope.recent[-1].global_norms[-1][1] == pytest.approx(norms[-1], rel=REL)
    assert _norm(model[2].parameters()) < norms[-1]


def test_transformers_frozen_encoder_head_optimizer() -> None:
    """A real architecture: BERT (from a config) fine-tuned head-only after full training steps."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 100, (4, 12))
    labels = torch.randint(0, 3, (4,))
    model(input_ids=ids, labels=labels).loss.backward()  # every parameter holds a gradient
    for p in model.bert.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=1e-3)
    with gradscope.watch(model, every=2) as scope:
        for _ in range(4):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            head = _norm(model.classifier.parameters())
            scope.step(opt, loss=loss)
            opt.step()
    assert _norm(model.parameters()) > 1.1 * head  # the stale encoder gradient would be counted
    assert scope.report().analysis["training"]["global_grad_norm_last"] == pytest.approx(head, rel=REL)


@pytest.mark.parametrize("every", [1, 4])
def test_parameters_an_unseen_optimizer_steps_stay_in_the_norm_and_the_check(every: int) -> None:
    """Two optimizers stepped together after one ``scope.step(opt)`` (AdamW for the
    matrices, SGD for the biases, as Muon + AdamW splits are run): the biases are held
    by no optimizer the watch was shown, so they stay in the step's norm, and a NaN in
    one of their gradients still stops the run at its step.  Scoping the norm to the
    one optimizer given dropped them (the norm read the matrices alone; the NaN passed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    matrices = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    adamw = torch.optim.AdamW(matrices, lr=1e-3)
    sgd = torch.optim.SGD(biases, lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    wants = []
    with pytest.raises(GradscopeError) as raised:
        with gradscope.watch(model, every=every, raise_on=("nonfinite",), on_finding=lambda f: None) as scope:
            for step in range(12):
                adamw.zero_grad()
                sgd.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                if step == 9:
                    model[2].bias.grad[1] = float("nan")
                wants.append(_norm(model.parameters()))
                scope.step(adamw)
                adamw.step()
                sgd.step()
    assert "step 9" in str(raised.value) and "2" in str(raised.value)
    training = scope.report().analysis["training"]
    assert training["global_grad_norm_last"] == pytest.approx(wants[8], rel=REL)
    assert wants[8] > _norm(matrices) * (1 + 1e-3)  # the biases' share is visible at this tolerance
