"""fl-clip21: Clip21 error feedback for client-side clipping, on Flower."""

__version__ = "0.1.0"
