"""What every Law M operator shares: its flags and the near-zero output layer."""

from __future__ import annotations

from torch import nn

# The last layer starts this close to zero so the first deltas are tiny and the early rollout is stable.
OUTPUT_INIT_STD = 1e-5


class QCAOperator(nn.Module):
    """Base of the operators: maps ``cat(real, imag)`` of shape ``(B, 2d, H, W)`` to a delta of the same shape.

    Class flags read by the engine: ``multiplicative`` (the output multiplies psi before it is added),
    ``recurrent`` (``forward(x, memory) -> (out, memory)``), ``grid_multiple`` (the grid must divide by it).
    """

    multiplicative: bool = False
    recurrent: bool = False
    grid_multiple: int = 1

    def __init__(self, d_state: int, hidden_channels: int) -> None:
        super().__init__()
        self.d_state = d_state
        self.hidden_channels = hidden_channels


def init_output_layer(conv: nn.Conv2d) -> nn.Conv2d:
    """Initialise the final 1x1 conv with std 1e-5 weights and zero bias."""
    nn.init.normal_(conv.weight, std=OUTPUT_INIT_STD)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv
