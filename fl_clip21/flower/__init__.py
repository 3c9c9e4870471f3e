"""Flower glue: strategies, client handlers, mods, simulation. ``Clip21CentralDP`` is importable from here."""

from __future__ import annotations


def __getattr__(name: str):
    # Lazily: importing a client-side module of this package need not import the strategies.
    if name == "Clip21CentralDP":
        from fl_clip21.flower.central_dp import Clip21CentralDP

        return Clip21CentralDP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
