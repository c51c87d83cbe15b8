"""Law M operators and their registry: ``model.architecture`` name -> class."""

from __future__ import annotations

from atheria_lightning.models.base import QCAOperator
from atheria_lightning.models.simple import MLP, DeepQCA
from atheria_lightning.models.unet import UNet, UNetConvLSTM, UNetUnitary

#: Accepted values of ``model.architecture``.
OPERATORS: dict[str, type[QCAOperator]] = {
    "UNET": UNet,
    "UNET_UNITARY": UNetUnitary,
    "MLP": MLP,
    "DEEP_QCA": DeepQCA,
    "UNET_CONVLSTM": UNetConvLSTM,
}


def operator_class(architecture: str) -> type[QCAOperator]:
    """The class registered under ``architecture``, or a ``ValueError`` naming the accepted ones."""
    if architecture not in OPERATORS:
        raise ValueError(f"model.architecture={architecture!r} is not one of {', '.join(OPERATORS)}")
    return OPERATORS[architecture]


__all__ = ["OPERATORS", "QCAOperator", "operator_class"]
