"""The integration tests run real Trainers on tiny models: one intra-op thread each,
and the thread count restored after, whatever a Trainer set (the autouse fixture
of ``diagnose_models``, applied here to every test of this folder)."""

from __future__ import annotations

from diagnose_models import one_thread  # noqa: F401 (an autouse fixture)
