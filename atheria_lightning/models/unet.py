"""The U-Net operators: UNET, UNET_UNITARY and UNET_CONVLSTM (memory at the bottleneck)."""

from __future__ import annotations

import torch
from torch import nn

from atheria_lightning.models.base import QCAOperator, init_output_layer


def group_count(channels: int) -> int:
    """``channels // 8`` GroupNorm groups when that divides the channels and channels > 8, else 1 (the original)."""
    if channels > 8 and channels % (channels // 8) == 0:
        return channels // 8
    return 1


class ConvBlock(nn.Sequential):
    """(3x3 conv without bias -> GroupNorm -> ELU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        groups = group_count(out_channels)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ELU(),
        )


class UNet(QCAOperator):
    """Two-level U-Net, h = hidden_channels, d = d_state; the grid must divide by 4.

    inc 2d->h; down1 pool + h->2h; down2 pool + 2h->4h; bottleneck 4h->8h; up1 8h->4h (+down1) -> 4h;
    up2 4h->2h (+inc) -> h; output 1x1 h->2d.
    """

    grid_multiple = 4

    def __init__(self, d_state: int, hidden_channels: int) -> None:
        super().__init__(d_state, hidden_channels)
        h = hidden_channels
        self.inc = ConvBlock(2 * d_state, h)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), ConvBlock(h, 2 * h))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), ConvBlock(2 * h, 4 * h))
        self.bottleneck = ConvBlock(4 * h, 8 * h)
        self.up1 = nn.ConvTranspose2d(8 * h, 4 * h, kernel_size=2, stride=2)
        self.conv_up1 = ConvBlock(6 * h, 4 * h)
        self.up2 = nn.ConvTranspose2d(4 * h, 2 * h, kernel_size=2, stride=2)
        self.conv_up2 = ConvBlock(3 * h, h)
        self.outc = init_output_layer(nn.Conv2d(h, 2 * d_state, 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.inc(x)  # (B, h, H, W)
        x2 = self.down1(x1)  # (B, 2h, H/2, W/2)
        bottom = self.bottleneck(self.down2(x2))  # (B, 8h, H/4, W/4)
        return x1, x2, bottom

    def decode(self, x1: torch.Tensor, x2: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        u1 = self.conv_up1(torch.cat([self.up1(bottom), x2], dim=1))  # (B, 4h, H/2, W/2)
        u2 = self.conv_up2(torch.cat([self.up2(u1), x1], dim=1))  # (B, h, H, W)
        return self.outc(u2)  # (B, 2d, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, bottom = self.encode(x)
        return self.decode(x1, x2, bottom)


class UNetUnitary(UNet):
    """The U-Net whose output multiplies psi (complex product) before it is added: a local unitary-like update."""

    multiplicative = True


class ConvLSTMCell(nn.Module):
    """One 3x3 conv over ``cat(x, h_prev)`` gives the input, forget, output and candidate gates."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gates = nn.Conv2d(2 * channels, 4 * channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, cell = memory if memory is not None else (torch.zeros_like(x), torch.zeros_like(x))
        i, f, o, g = self.gates(torch.cat([x, hidden], dim=1)).chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        return hidden, cell


class UNetConvLSTM(UNet):
    """The U-Net with a ConvLSTM at the bottleneck; its (hidden, cell) state carries from step to step."""

    recurrent = True

    def __init__(self, d_state: int, hidden_channels: int) -> None:
        super().__init__(d_state, hidden_channels)
        self.memory_cell = ConvLSTMCell(8 * hidden_channels)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x1, x2, bottom = self.encode(x)
        hidden, cell = self.memory_cell(bottom, memory)  # each (B, 8h, H/4, W/4)
        return self.decode(x1, x2, hidden), (hidden, cell)
