"""Building blocks shared by the VQ-VAE and VQ-VAE-2 of the paper (spec section 5)."""
from __future__ import annotations

from torch import nn


class ResBlock(nn.Module):
    """``x + [ReLU, Conv3x3 c->r, ReLU, Conv1x1 r->c](x)``.

    The CIFAR-10 VQ-VAE uses convolutions without bias, the VQ-VAE-2 with bias (as the reference
    implementation does), hence ``bias``.
    """

    def __init__(self, channels: int, res_channels: int, bias: bool = True):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1, bias=bias),
        )

    def forward(self, x):
        return x + self.block(x)


def res_stack(channels: int, res_channels: int, num_blocks: int, bias: bool = True) -> list[nn.Module]:
    """``num_blocks`` :class:`ResBlock` s followed by a ReLU (the spec's "2 ResBlocks; ReLU")."""
    return [ResBlock(channels, res_channels, bias) for _ in range(num_blocks)] + [nn.ReLU()]


def encoder_stride4(in_channels: int, channels: int, res_channels: int, num_blocks: int, bias: bool = True) -> nn.Sequential:
    """Conv in->c/2 k4 s2 p1, ReLU; Conv c/2->c k4 s2 p1, ReLU; Conv c->c k3 p1; ResBlocks; ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels // 2, channels, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        *res_stack(channels, res_channels, num_blocks, bias),
    )


def encoder_stride2(in_channels: int, channels: int, res_channels: int, num_blocks: int, bias: bool = True) -> nn.Sequential:
    """Conv in->c/2 k4 s2 p1, ReLU; Conv c/2->c k3 p1; ResBlocks; ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels // 2, channels, 3, padding=1),
        *res_stack(channels, res_channels, num_blocks, bias),
    )


def decoder_stride4(in_channels: int, out_channels: int, channels: int, res_channels: int, num_blocks: int,
                    bias: bool = True) -> nn.Sequential:
    """Conv3x3 in->c; ResBlocks; ReLU; ConvT c->c/2 k4 s2 p1, ReLU; ConvT c/2->out k4 s2 p1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        *res_stack(channels, res_channels, num_blocks, bias),
        nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(channels // 2, out_channels, 4, stride=2, padding=1),
    )


def decoder_stride2(in_channels: int, out_channels: int, channels: int, res_channels: int, num_blocks: int,
                    bias: bool = True) -> nn.Sequential:
    """Conv3x3 in->c; ResBlocks; ReLU; ConvT c->out k4 s2 p1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        *res_stack(channels, res_channels, num_blocks, bias),
        nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1),
    )
