"""Initial universes and the per-cell normalisation of the QCA state."""

from __future__ import annotations

import torch

#: Accepted values of ``model.initial_state``.
INITIAL_STATES = ("random", "complex_noise", "zeros")

# Added to the norm before dividing, as in the original engine, so an all-zero cell stays finite.
NORM_EPS = 1e-9


def cell_norm(psi: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each cell over its ``d_state`` amplitudes: ``(B, H, W, d) -> (B, H, W, 1)``."""
    return psi.abs().pow(2).sum(-1, keepdim=True).sqrt()


def normalize(psi: torch.Tensor) -> torch.Tensor:
    """Scale every cell to unit norm: ``psi / (|psi|_cell + 1e-9)``."""
    return psi / (cell_norm(psi) + NORM_EPS)


def multiply_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The complex product ``x * y`` of two tensors held as real pairs (last dimension: real, imaginary)."""
    (x_re, x_im), (y_re, y_im) = x.unbind(-1), y.unbind(-1)
    return torch.stack([x_re * y_re - x_im * y_im, x_re * y_im + x_im * y_re], dim=-1)


def normalize_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` of a state held as real pairs, ``torch.view_as_real(psi)``: ``(B, H, W, d, 2)``.

    Real arithmetic only, which inductor turns into fused kernels (it has no code for complex tensors); the same
    numbers as :func:`normalize` up to the rounding of the sum of squares.
    """
    return pairs / (pairs.pow(2).sum((-2, -1), keepdim=True).sqrt() + NORM_EPS)


def initial_state(
    kind: str,
    universes: int,
    grid_size: int,
    d_state: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The "primordial soup" of one episode, complex64 of shape ``(B, H, W, d_state)``.

    - ``random``: real and imaginary parts standard normal, each cell normalised to 1 (the original's default);
    - ``complex_noise``: a uniform vacuum (every amplitude ``1/sqrt(d)``) plus weak complex noise (std 0.1),
      normalised per cell: a nearly ordered start;
    - ``zeros``: the empty universe; the operator alone must create matter.
    """
    if kind not in INITIAL_STATES:
        raise ValueError(f"initial_state={kind!r} is not one of {', '.join(INITIAL_STATES)}")
    shape = (universes, grid_size, grid_size, d_state)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.complex64, device=device)
    real = torch.randn(shape, generator=generator, device=device)
    imag = torch.randn(shape, generator=generator, device=device)
    if kind == "complex_noise":
        real = d_state**-0.5 + 0.1 * real
        imag = 0.1 * imag
    return normalize(torch.complex(real, imag))


def psi_magnitude(psi: torch.Tensor) -> torch.Tensor:
    """``sum_d |psi|`` of the first universe, ``(H, W)``: the field whose spread the complexity term rewards.

    (The per-cell L2 norm is 1 everywhere after each step, so it would show nothing.)
    """
    return psi[0].abs().sum(-1)
