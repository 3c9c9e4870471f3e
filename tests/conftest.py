"""Shared fixtures."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# One profile for every property test: no deadline and no "too slow" health check,
# since these 2-core machines are shared (a loaded run once failed a health check,
# never an assertion), and derandomized, so that a run's examples are the same on
# every machine and a failure reproduces with the same command.
settings.register_profile(
    "fl-clip21", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fl-clip21")


@pytest.fixture
def flower_task():
    """Flower's task identity, which building a Message needs (set by the engine in a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
