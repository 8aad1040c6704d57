"""Sharded and data-parallel set-ups found wrong in a field trial (2-process gloo groups on CPU).

Each case failed before its fix, and each is one example of a class:

* a gradient laid out otherwise than its parameter (TP: an Embedding under
  RowwiseParallel has a Shard(0) weight and a Replicate gradient) was counted
  once per rank;
* ranks that ran different layers (``find_unused_parameters``, a
  data-dependent branch or order) summed update-ratio vectors of different
  layouts: gloo aborted, or one layer's ratio was added into another's;
* a DTensor loss (``loss_parallel``) raised a bare AssertionError;
* HSDP's data-parallel degree was the replicate dimension alone (∂ℓ/∂h 2x);
* FSDP1 ``NO_SHARD`` with ``use_orig_params=True`` read its alignment padding
  (the value 42) as the next parameter's;
* FSDP1 tied weights (GPT-2's head and embedding) lost the second owner;
* a NaN one rank made at a sampled step was attributed to rank 0.

Every number is checked against one unsharded process on the same data.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradscope
from tests.test_distributed import WORLD, in_gloo_group, run_ranks

pytestmark = pytest.mark.slow

STEPS = 3


def _quiet(finding: Any) -> None:
    """on_finding for runs whose alerts are not under test."""


def _data(step: int, rows: int = 16, features: int = 8) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(100 + step))


def _rows(x: torch.Tensor, rank: int | None) -> torch.Tensor:
    if rank is None:
        return x
    half = x.shape[0] // WORLD
    return x[rank * half : (rank + 1) * half]


def _layers(report: Any) -> dict[str, dict]:
    return {layer["name"]: layer for layer in report.record.to_dict()["layers"]}


def _train(model: nn.Module, batch: Any, loss_of: Any = None, every: int = 1) -> Any:
    """SGD steps; ``batch(step)`` is this rank's input; returns the report."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, every=every, raise_on=(), on_finding=_quiet) as scope:
        for step in range(STEPS):
            opt.zero_grad()
            out = model(batch(step))
            loss = loss_of(out, step) if loss_of is not None else out.float().pow(2).mean()
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return scope.report()


# -- the models ------------------------------------------------------------------


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 4))


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 12, (8, 3), generator=torch.Generator().manual_seed(step))


class _Routed(nn.Module):
    """Two layers in a data-dependent order and a third only some calls run."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(8, 8)
        self.q = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)
        with torch.no_grad():
            self.q.weight.mul_(10)  # very different weight norms: a mixed-up ratio shows

    def forward(self, x: torch.Tensor, route: int) -> torch.Tensor:
        if route == 0:
            return self.q(self.p(x))
        return self.extra(self.p(self.q(x)))


def _odd_model() -> nn.Module:
    """Sizes that are not multiples of FSDP1's alignment: padding between parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


class _Tied(nn.Module):
    """An output head sharing the embedding's weight (GPT-2's wte / lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _ids11(step: int) -> torch.Tensor:
    return torch.randint(0, 11, (8, 3), generator=torch.Generator().manual_seed(50 + step))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


# -- what each rank runs -----------------------------------------------------------


def _tp_embedding(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    model = _embedding_model()
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"0": RowwiseParallel(input_layouts=Replicate())})
    report = _train(model, _ids)
    return {
        "grad_placements": str(model[0].weight.grad.placements),
        "norm": report.analysis["training"]["global_grad_norm_last"],
        "weight_grad_count": _layers(report)["0"]["weight_grad"]["count"],
    }


def _routed(rank: int) -> dict[str, Any]:
    """DDP with find_unused_parameters: rank 1 runs ``extra`` and the other order."""
    model = _Routed()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    true: dict[int, dict[str, float]] = {}
    with gradscope.watch(model, every=1, raise_on=(), on_finding=_quiet) as scope:
        for step in range(STEPS):
            opt.zero_grad()
            before = {name: model.get_submodule(name).weight.detach().clone() for name in ("p", "q")}
            loss = ddp(_rows(_data(step), rank), rank).pow(2).mean()
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
            true[step] = {
                name: float((model.get_submodule(name).weight.detach() - w).norm() / w.norm())
                for name, w in before.items()
            }
    report = scope.report()
    seen: dict[int, dict[str, float]] = {}
    for flush in scope.recent:
        for step, ratios in flush.update_ratios.items():
            seen.setdefault(step, {}).update(ratios)
    return {"true": true, "seen": seen, "layers": sorted(_layers(report))}


def _loss_parallel(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    parallelize_module(
        model,
        init_device_mesh("cpu", (WORLD,)),
        {"0": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)},
    )

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, every=1, raise_on=(), on_finding=_quiet) as scope:
        for step in range(STEPS):
            opt.zero_grad()
            logits = model(_data(step))
            with loss_parallel():  # a Replicate DTensor loss, its gradient a Shard(-1) one
                loss = nn.functional.cross_entropy(logits, torch.arange(16) % 6)
                loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return {"loss": scope.report().analysis["training"]["loss_last"]}


def _hsdp(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    model = _mlp()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = _train(model, lambda step: _rows(_data(step), rank))
    return {"report": report.record.to_dict()["layers"], "reduction": report.run["reduction"]}


def _fsdp1_no_shard(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    model = FullyShardedDataParallel(
        _odd_model(), use_orig_params=True, sharding_strategy=ShardingStrategy.NO_SHARD, device_id=torch.device("cpu")
    )
    report = _train(model, lambda step: _rows(_data(step), rank))
    return {"layers": report.record.to_dict()["layers"], "norm": report.analysis["training"]["global_grad_norm_last"]}


def _fsdp1_tied(rank: int, use_orig_params: bool) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(_Tied(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    report = _train(model, lambda step: _rows(_ids11(step), rank), lambda out, step: out.pow(2).mean())
    return {"layers": report.record.to_dict()["layers"], "norm": report.analysis["training"]["global_grad_norm_last"]}


def _nan_on_rank_one(rank: int, engine: str) -> dict[str, Any]:
    model = _mlp()
    if engine == "ddp":
        trained: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        trained = fully_shard(model)
    state = {"bad": False}
    model[2].register_forward_hook(lambda m, a, out: out * math.inf if state["bad"] else out)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        with gradscope.watch(model, every=1, on_finding=_quiet) as scope:
            for step in range(6):
                state["bad"] = rank == 1 and step == 2
                opt.zero_grad()
                loss = trained(_rows(_data(step), rank)).pow(2).mean()
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    except gradscope.GradscopeError as error:
        return {key: error.record.get(key) for key in ("step", "layer", "role", "rank")}
    return {"error": None}


def _validation_per_rank(rank: int) -> dict[str, Any]:
    """Each rank passes its own shard's validation loss (rank 0's rises, rank 1's falls),
    with stop_on=("overfitting",), then meets the other in a barrier (a checkpoint save)."""
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mine = [1.0, 0.9, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5] if rank == 0 else [1.0 - 0.05 * i for i in range(10)]
    out: dict[str, Any] = {"stopped": None, "last_loss": None}
    try:
        with gradscope.watch(model, every=1, on_finding=_quiet, stop_on=("overfitting",)) as scope:
            for step in range(20):
                opt.zero_grad()
                loss = ddp(_rows(_data(step), rank)).pow(2).mean()
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
                if step % 2 == 1:
                    out["last_loss"] = scope.validation(mine[step // 2])["loss"]
    except gradscope.GradscopeError:
        out["stopped"] = scope.steps
    dist.barrier()  # every rank reaches it: none was left waiting in a collective
    return out


def _results(rank: int) -> dict[str, Any]:
    return {
        "tp_embedding": _tp_embedding(rank),
        "routed": _routed(rank),
        "loss_parallel": _loss_parallel(rank),
        "hsdp": _hsdp(rank),
        "fsdp1_no_shard": _fsdp1_no_shard(rank),
        "fsdp1_tied_flat": _fsdp1_tied(rank, use_orig_params=False),
        "fsdp1_tied_orig": _fsdp1_tied(rank, use_orig_params=True),
        "nan_ddp": _nan_on_rank_one(rank, "ddp"),
        "nan_fsdp2": _nan_on_rank_one(rank, "fsdp2"),
        "validation": _validation_per_rank(rank),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    in_gloo_group(rank, port, out_dir, lambda: _results(rank))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    return run_ranks(_worker, (), tmp_path_factory.mktemp("field"), "field")


def _stats_equal(got: dict, want: dict, what: str) -> None:
    assert got is not None and want is not None, what
    assert got["count"] == want["count"], what
    for key in ("mean", "std", "min", "max"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), f"{what} {key}"


# -- the checks ----------------------------------------------------------------------


def test_a_replicated_gradient_of_a_sharded_parameter_counts_once(ranks: dict[int, dict]) -> None:
    report = _train(_embedding_model(), _ids)
    want_norm = report.analysis["training"]["global_grad_norm_last"]
    want_count = _layers(report)["0"]["weight_grad"]["count"]
    for rank in range(WORLD):
        got = ranks[rank]["tp_embedding"]
        assert got["grad_placements"] == "(Replicate(),)"  # the layout that was double-counted
        assert got["weight_grad_count"] == want_count == 96
        assert got["norm"] == pytest.approx(want_norm, rel=1e-6)


def test_ranks_running_different_layers_keep_each_layers_update_ratio(ranks: dict[int, dict]) -> None:
    for rank in range(WORLD):
        got = ranks[rank]["routed"]
        # extra ran on rank 1 only: its report has it, rank 0's a note (tests/test_distributed.py)
        assert got["layers"] == (["extra", "p", "q"] if rank == 1 else ["p", "q"])
        for step in range(STEPS):
            for name in ("p", "q"):
                # 8 x 8 weights: the ratio is read from every element, so it is exact
                assert got["seen"][str(step)][name] == pytest.approx(got["true"][str(step)][name], rel=1e-5)
        assert got["true"]["0"]["p"] > 10 * got["true"]["0"]["q"]  # a sum of the two would show


def test_a_loss_parallel_dtensor_loss_is_observed(ranks: dict[int, dict]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(_data(step)), torch.arange(16) % 6)
        loss.backward()
        opt.step()
    for rank in range(WORLD):
        assert ranks[rank]["loss_parallel"]["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_hsdp_gradients_wrt_outputs_are_at_single_process_scale(ranks: dict[int, dict]) -> None:
    want = _layers(_train(_mlp(), lambda step: _data(step)))
    for rank in range(WORLD):
        got = {layer["name"]: layer for layer in ranks[rank]["hsdp"]["report"]}
        assert ranks[rank]["hsdp"]["reduction"]["data_parallel"] == WORLD  # 1 x 2 mesh: both see other rows
        for name in ("0", "2", "4"):
            for role in ("activation", "gradient", "weight", "weight_grad"):
                _stats_equal(got[name][role], want[name][role], f"hsdp {name} {role}")


def test_fsdp1_no_shard_with_original_parameters_skips_the_alignment_padding(ranks: dict[int, dict]) -> None:
    report = _train(_odd_model(), lambda step: _data(step))
    want = _layers(report)
    for rank in range(WORLD):
        got = {layer["name"]: layer for layer in ranks[rank]["fsdp1_no_shard"]["layers"]}
        for name in ("0", "2", "4"):
            for role in ("weight", "weight_grad"):
                _stats_equal(got[name][role], want[name][role], f"no_shard {name} {role}")
            assert got[name]["weight"]["max"] < 1  # the padding value 42 read as a weight showed here
        assert ranks[rank]["fsdp1_no_shard"]["norm"] == pytest.approx(
            report.analysis["training"]["global_grad_norm_last"], rel=1e-6
        )


@pytest.mark.parametrize("variant", ["fsdp1_tied_flat", "fsdp1_tied_orig"])
def test_fsdp1_tied_weights_are_measured_for_every_owner(ranks: dict[int, dict], variant: str) -> None:
    report = _train(_Tied(), _ids11, lambda out, step: out.pow(2).mean())
    want = _layers(report)
    for rank in range(WORLD):
        got = {layer["name"]: layer for layer in ranks[rank][variant]["layers"]}
        assert got["head"]["weight_shape"] == want["head"]["weight_shape"] == [11, 8]
        for role in ("weight", "weight_grad"):
            _stats_equal(got["head"][role], want["head"][role], f"{variant} head {role}")
        # the tied weight's norm counts once, as one process counts it
        assert ranks[rank][variant]["norm"] == pytest.approx(report.analysis["training"]["global_grad_norm_last"], 1e-5)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_nan_one_rank_made_at_a_sampled_step_names_that_rank(ranks: dict[int, dict], engine: str) -> None:
    for rank in range(WORLD):
        assert ranks[rank][f"nan_{engine}"] == {"step": 2, "layer": "2", "role": "activation", "rank": 1}


def test_validation_losses_are_averaged_so_every_rank_stops_together(ranks: dict[int, dict]) -> None:
    """scope.validation was per rank: rank 0 stopped on its own rising loss and rank 1
    trained on into a collective that never completed (a hang until the timeout)."""
    first, second = ranks[0]["validation"], ranks[1]["validation"]
    assert first["stopped"] is not None and first == second
