"""Shared fixtures, kept minimal: other test files add their own locally."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

# One intra-op thread for the whole suite: the models in the tests are small,
# and on a shared 2-core machine torch's spinning thread pool made them up to
# 15x slower.  Tests that need more threads set them locally.
torch.set_num_threads(1)


def _hook_counts(model: nn.Module) -> dict[str, int]:
    """Number of module hooks of each kind left anywhere in ``model``."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {kind: sum(len(getattr(m, kind, {})) for m in model.modules()) for kind in kinds}


@pytest.fixture
def assert_no_hooks() -> Callable[[nn.Module], None]:
    """A checker that fails when any module of a model still carries a hook."""

    def check(model: nn.Module) -> None:
        left = {kind: n for kind, n in _hook_counts(model).items() if n}
        assert not left, f"hooks left on the model: {left}"

    return check
