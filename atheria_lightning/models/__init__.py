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


def build_operator(architecture: str, d_state: int, hidden_channels: int) -> QCAOperator:
    """Instantiate the operator ``architecture`` for ``d_state`` amplitudes per cell."""
    return operator_class(architecture)(d_state, hidden_channels)


__all__ = ["OPERATORS", "QCAOperator", "build_operator", "operator_class"]
