"""Flower ClientApp of fl-clip21 (``flwr run .`` and SuperNodes load this)."""

from fl_clip21.flower.client import make_client_app

app = make_client_app()
