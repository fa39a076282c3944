"""Unet3D: the MedSyn stage-1 denoiser, conditioned on time and text.

The network maps a noisy volume x_t (B, C, F, H, W) in [-1, 1], a time t (B,) and
text embeddings (B, T, cond_dim) to a prediction of the clean volume x0 with the
same shape. Its in-plane blocks downsample H and W only, never the F slices. Text
enters only through the four cross-attention layers in the middle, which run at
(F, H / 2^(L-1), W / 2^(L-1)) for L = ``len(dim_mults)`` levels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medsyn_xai.model.layers import (
    CrossAttention,
    PreNorm,
    Residual,
    ResnetBlock,
    SelfAttention,
    SinusoidalPositionEmbedding,
    SlicePositionEmbedding,
    SliceTokens,
    downsample,
    upsample,
)

__all__ = ["UnetConfig", "Unet3D", "OFFICIAL_MEDSYN_CONFIG", "N_MIDDLE_ROUNDS"]

N_MIDDLE_ROUNDS = 4
IN_PLANE = (1, 3, 3)
VOLUMETRIC = (3, 3, 3)


@dataclass(frozen=True)
class UnetConfig:
    """Architecture of :class:`Unet3D`.

    Attributes:
        dim: channels after the first convolution; level i has ``dim * dim_mults[i]``.
        dim_mults: channel multiplier per level; every level but the last halves H, W.
        channels: input and output channels (CT plus mask channels).
        heads, dim_head: attention heads and width per head, for self- and cross-attention.
        cond_dim: width D of the text embeddings.
        text_tokens: length T of the text sequence (and of the null embedding).
        init_kernel_size: odd kernel of the first 3D convolution.
        resnet_groups: group-norm groups.
        up_path_order: "inference" runs block1, block2, 3D block, upsample in each
            up level, as MedSyn's sampling script does; "training" runs block1,
            upsample, block2, 3D block, as its training script does.
        slice_position_embedding: add a learned embedding of each slice's relative
            height to the middle features before the cross-attention rounds, so
            that a text word can place a finding high or low in the volume. MedSyn
            has none, and the default model uses it.
        attend_to_padding: True lets cross-attention attend to the padding
            positions of the text, as MedSyn does. False masks them out, so the
            attention falls on the prompt's own tokens. The option changes no weight.
    """

    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2)
    channels: int = 5
    heads: int = 4
    dim_head: int = 16
    cond_dim: int = 384
    text_tokens: int = 128
    init_kernel_size: int = 7
    resnet_groups: int = 8
    up_path_order: Literal["inference", "training"] = "inference"
    attend_to_padding: bool = True
    slice_position_embedding: bool = False

    def __post_init__(self) -> None:
        if self.init_kernel_size % 2 != 1:
            raise ValueError(f"init_kernel_size is {self.init_kernel_size}: use an odd number")
        if self.up_path_order not in ("inference", "training"):
            raise ValueError(f"up_path_order is {self.up_path_order!r}: use 'inference' or 'training'")
        widths = [self.dim, *(self.dim * m for m in self.dim_mults)]
        for width in widths:
            if width % self.resnet_groups:
                raise ValueError(
                    f"channel width {width} is not divisible by resnet_groups={self.resnet_groups}: "
                    "change dim or resnet_groups"
                )

    @property
    def downsample_factor(self) -> int:
        """Factor by which H and W shrink from the input to the middle blocks."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict of the fields."""
        data = dataclasses.asdict(self)
        data["dim_mults"] = list(self.dim_mults)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UnetConfig":
        """Build a config from :meth:`to_dict` output, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Unet3D config key '{unknown[0]}': valid keys are {', '.join(sorted(known))}")
        values = dict(data)
        if "dim_mults" in values:
            values["dim_mults"] = tuple(values["dim_mults"])
        return cls(**values)


OFFICIAL_MEDSYN_CONFIG = UnetConfig(
    dim=160,
    dim_mults=(1, 2, 4, 8),
    channels=4,
    heads=8,
    dim_head=32,
    cond_dim=768,
    text_tokens=192,
)


class Unet3D(nn.Module):
    """The MedSyn stage-1 denoiser; see the module docstring for shapes."""

    def __init__(self, config: UnetConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        groups = config.resnet_groups
        time_dim = dim * 4

        padding = config.init_kernel_size // 2
        self.init_conv = nn.Conv3d(config.channels, dim, config.init_kernel_size, padding=padding)

        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        # Learned stand-in for the text in classifier-free guidance (B=1, T, D).
        self.null_cond_emb = nn.Parameter(torch.randn(1, config.text_tokens, config.cond_dim))

        dims = [dim, *(dim * m for m in config.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n_levels = len(in_out)

        def block(dim_in: int, dim_out: int, kernel=IN_PLANE) -> ResnetBlock:
            return ResnetBlock(dim_in, dim_out, time_emb_dim=time_dim, kernel=kernel, groups=groups)

        self.downs = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(in_out):
            is_last = level == n_levels - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        block(dim_in, dim_out),
                        block(dim_out, dim_out),
                        block(dim_out, dim_out, VOLUMETRIC),
                        nn.Identity() if is_last else downsample(dim_out),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        if config.slice_position_embedding:
            self.mid_slice_position = SlicePositionEmbedding(mid_dim)
        # One self-attention module serves all four rounds; each round has its own norm.
        shared_self_attention = SliceTokens(SelfAttention(mid_dim, heads=config.heads, dim_head=config.dim_head))
        for round_index in range(1, N_MIDDLE_ROUNDS + 1):
            cross = CrossAttention(mid_dim, config.cond_dim, heads=config.heads, dim_head=config.dim_head)
            setattr(self, f"mid_spatial_attn{round_index}", Residual(PreNorm(mid_dim, shared_self_attention)))
            setattr(self, f"mid_cross_attn{round_index}", Residual(PreNorm(mid_dim, cross)))
            setattr(self, f"mid_temporal_attn{round_index}", block(mid_dim, mid_dim, VOLUMETRIC))
        self.mid_block2 = block(mid_dim, mid_dim)

        self.ups = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = level == n_levels - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        block(dim_out * 2, dim_in),
                        block(dim_in, dim_in),
                        block(dim_in, dim_in, VOLUMETRIC),
                        nn.Identity() if is_last else upsample(dim_in),
                    ]
                )
            )

        self.final_conv = nn.Sequential(
            ResnetBlock(dim * 2, dim, groups=groups),
            nn.Conv3d(dim, config.channels, 1),
        )

    def cross_attention_layers(self) -> list[CrossAttention]:
        """Return the four middle cross-attention layers in forward order."""
        return [getattr(self, f"mid_cross_attn{i}").fn.fn for i in range(1, N_MIDDLE_ROUNDS + 1)]

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict x0.

        Args:
            x: noisy volume (B, C, F, H, W), float32; H and W divisible by
                ``config.downsample_factor``.
            time: (B,) diffusion time on the network's scale, t * 1000 for t in [0, 1].
            context: text embeddings (B, T, cond_dim); pass ``null_cond_emb``
                expanded to B for the unconditional branch.
            context_mask: bool (B, T), True at the prompt's positions and False at
                padding (the tokenizer's attention mask). Used only when
                ``config.attend_to_padding`` is False; None attends to every position.

        Returns:
            Predicted x0, (B, C, F, H, W).
        """
        factor = self.config.downsample_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"input height and width {tuple(x.shape[-2:])} must be divisible by {factor} "
                f"for dim_mults={self.config.dim_mults}"
            )

        x = self.init_conv(x)
        first = x.clone()
        t = self.time_mlp(time)

        skips = []
        for block1, block2, block3d, down in self.downs:
            x = block1(x, t)
            x = block2(x, t)
            skips.append(x)
            x = down(x)
            x = block3d(x, t)

        if self.config.attend_to_padding:
            context_mask = None
        elif context_mask is not None:
            context_mask = context_mask.to(device=context.device, dtype=torch.bool)

        x = self.mid_block1(x, t)
        if self.config.slice_position_embedding:
            x = self.mid_slice_position(x)
        for i in range(1, N_MIDDLE_ROUNDS + 1):
            x = getattr(self, f"mid_spatial_attn{i}")(x)
            x = getattr(self, f"mid_cross_attn{i}")(x, context=context, context_mask=context_mask)
            x = getattr(self, f"mid_temporal_attn{i}")(x, t)
        x = self.mid_block2(x, t)

        for block1, block2, block3d, up in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block1(x, t)
            if self.config.up_path_order == "training":
                x = up(x)
                x = block2(x, t)
                x = block3d(x, t)
            else:
                x = block2(x, t)
                x = block3d(x, t)
                x = up(x)

        x = torch.cat((x, first), dim=1)
        return self.final_conv(x)
