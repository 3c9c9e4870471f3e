"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_task():
    """Flower's task identity, which building a Message needs (set by the engine in a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
