"""The purely local operators: MLP (1x1 convs) and DEEP_QCA (fixed neighbour sum + 1x1 MLP)."""

from __future__ import annotations

import torch
from torch import nn

from atheria_lightning.models.base import QCAOperator, init_output_layer


def pointwise_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """1x1 convs in -> h -> h -> out with ELU between; the last starts near zero."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1),
        nn.ELU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ELU(),
        init_output_layer(nn.Conv2d(hidden, out_channels, 1)),
    )


class MLP(QCAOperator):
    """Each cell updated from its own state only: 1x1 convs 2d -> h -> h -> 2d."""

    def __init__(self, d_state: int, hidden_channels: int) -> None:
        super().__init__(d_state, hidden_channels)
        self.mlp = pointwise_mlp(2 * d_state, hidden_channels, 2 * d_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# Outputs per input channel of the neighbour sum (as the original's DEEP_QCA perception layer).
NEIGHBOUR_FEATURES = 8


class DeepQCA(QCAOperator):
    """A cellular automaton: a fixed depthwise 3x3 neighbour sum (centre 0), then the 1x1 MLP 16d -> h -> h -> 2d."""

    def __init__(self, d_state: int, hidden_channels: int) -> None:
        super().__init__(d_state, hidden_channels)
        channels = 2 * d_state
        self.perceive = nn.Conv2d(
            channels, NEIGHBOUR_FEATURES * channels, 3, padding=1, groups=channels, bias=False, padding_mode="circular"
        )
        kernel = torch.ones(3, 3)
        kernel[1, 1] = 0.0
        with torch.no_grad():
            self.perceive.weight.copy_(kernel.expand_as(self.perceive.weight))
        self.perceive.weight.requires_grad_(False)
        self.mlp = pointwise_mlp(NEIGHBOUR_FEATURES * channels, hidden_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.perceive(x))  # (B, 16d, H, W) -> (B, 2d, H, W)
