"""Stopping an in-process run from outside (SIGINT, SIGTERM): a flag the ServerApp's waits check.

Flower runs the ServerApp in a thread of the process that started the
simulation; a signal only reaches the main thread, and a ServerApp thread that
is waiting (for nodes, for replies) would wait on and keep the process alive.
:func:`fl_clip21.flower.simulation.stop_on_signals` sets the flag; every call
the ServerApp makes on its grid checks it (:func:`stoppable`), and waits that
do not go through the grid call :func:`wait` instead of ``time.sleep``. Either
raises :class:`RunStopped` in the ServerApp's thread, which ends the
simulation the ordinary way: Flower stops its runtime and shuts Ray down.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.serverapp import Grid

_EVENT = threading.Event()
_SIGNAL: list[int] = []  # the signal that set the flag (one entry), for the exit status and the message

GRID_CALLS = ("get_node_ids", "get_nodes", "push_messages", "pull_messages", "send_and_receive")


class RunStopped(Exception):
    """The run was asked to stop (a signal); ``signum`` says which, ``exit_status`` is 128 + signum.

    ``detail`` (e.g. where the checkpoint is) follows the signal in the message.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f"; {detail}" if detail else ""))


class StopNow(BaseException):
    """A second signal: raised in the main thread at once, past Flower's ``except Exception`` handlers."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"stopped by a second {signal.Signals(signum).name}" + (f"; {detail}" if detail else ""))


def request(signum: int) -> None:
    """Ask the run in this process to stop, because of signal ``signum``."""
    if not _EVENT.is_set():
        _SIGNAL[:] = [signum]
        _EVENT.set()


def requested() -> bool:
    """Whether a stop was asked for (and not :func:`reset` since)."""
    return _EVENT.is_set()


def reset() -> None:
    """Forget an earlier stop: a new run starts."""
    _EVENT.clear()
    _SIGNAL.clear()


def check() -> None:
    """Raise :class:`RunStopped` if a stop was asked for."""
    if _EVENT.is_set():
        raise RunStopped(_SIGNAL[0] if _SIGNAL else signal.SIGINT)


def wait(seconds: float) -> None:
    """``time.sleep(seconds)`` that ends at once, with :class:`RunStopped`, when a stop is asked for."""
    _EVENT.wait(seconds)
    check()


def _checked(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check()
        return call(*args, **kwargs)

    return checked


def stoppable(grid: Grid) -> Grid:
    """``grid``, whose calls raise :class:`RunStopped` once a stop is asked for.

    The methods are replaced on this object, not wrapped in another one, so the
    strategies still get Flower's grid class (Clip21Strategy checks for the
    simulation's InMemoryGrid). Flower's ``send_and_receive`` polls with
    ``pull_messages``, so a wait for replies ends within one poll interval.
    """
    for name in GRID_CALLS:
        if hasattr(grid, name):
            setattr(grid, name, _checked(getattr(grid, name)))
    return grid
