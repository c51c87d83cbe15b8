"""Atheria's Law M training as a PyTorch Lightning application that survives session kills."""

__version__ = "0.1.0"
