"""Building blocks of the MedSyn stage-1 denoiser.

Volumes are channel-first (B, C, F, H, W): F slices of H x W pixels. The module
attribute names (``block1.proj``, ``fn.norm.gamma``, ``fn.fn.to_q``...) are part of
the checkpoint format: they match the state-dict keys of MedSyn's official weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "Block",
    "ChannelLayerNorm",
    "CrossAttention",
    "CrossAttentionProcessor",
    "PreNorm",
    "Residual",
    "ResnetBlock",
    "SelfAttention",
    "SinusoidalPositionEmbedding",
    "SliceTokens",
    "downsample",
    "upsample",
]


class SinusoidalPositionEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar time (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(
            torch.arange(half, device=time.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
        )
        angles = time.float()[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class SlicePositionEmbedding(nn.Module):
    """Learned per-slice offset added to volume features (B, C, F, H, W).

    Each slice's relative height z / (F - 1) in [0, 1] (0 for a single slice)
    becomes ``features`` fixed sinusoids, which a linear layer maps to C channels.
    The layer starts at zero, so adding the embedding to a trained network leaves
    its output unchanged until the embedding is trained. :meth:`reset_parameters`
    with a positive ``std`` starts it random instead, so that slices differ from
    the first training step.
    """

    def __init__(self, dim: int, *, features: int = 16) -> None:
        super().__init__()
        self.features = features
        self.proj = nn.Linear(features, dim)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Set the bias to zero and draw the weight from N(0, std^2), or set it to zero when std is 0."""
        with torch.no_grad():
            self.proj.bias.zero_()
            self.proj.weight.zero_()
            if std > 0:
                self.proj.weight.normal_(0.0, std, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = x.shape[2]
        height = torch.linspace(0.0, 1.0, slices, device=x.device) if slices > 1 else x.new_zeros(1)
        frequencies = math.pi * torch.arange(1, self.features // 2 + 1, device=x.device, dtype=torch.float32)
        angles = height[:, None] * frequencies[None, :]  # (F, features / 2)
        offsets = self.proj(torch.cat((angles.sin(), angles.cos()), dim=-1))  # (F, C)
        return x + offsets.T.to(x.dtype)[None, :, :, None, None]


class Residual(nn.Module):
    """``fn(x) + x``; keyword arguments go to ``fn``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x, **kwargs) + x


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, F, H, W), with a gain and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (variance + self.eps).sqrt() * self.gamma


class PreNorm(nn.Module):
    """Channel layer norm, then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Block(nn.Module):
    """Convolution, group norm, optional time scale and shift, SiLU.

    ``kernel`` is (1, 3, 3) for the in-plane blocks and (3, 3, 3) for the 3D ones.
    """

    def __init__(self, dim: int, dim_out: int, *, kernel: tuple[int, int, int], groups: int = 8) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.proj = nn.Conv3d(dim, dim_out, kernel, padding=padding)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two :class:`Block` s with a residual connection, conditioned on the time embedding.

    Args:
        dim: input channels.
        dim_out: output channels.
        time_emb_dim: width of the time embedding; None builds a block without one.
        kernel: (1, 3, 3) works within each slice, (3, 3, 3) across slices too.
        groups: group-norm groups.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        time_emb_dim: int | None = None,
        kernel: tuple[int, int, int] = (1, 3, 3),
        groups: int = 8,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if time_emb_dim else None
        self.block1 = Block(dim, dim_out, kernel=kernel, groups=groups)
        self.block2 = Block(dim_out, dim_out, kernel=kernel, groups=groups)
        self.res_conv = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None:
            if time_emb is None:
                raise ValueError("this block is time-conditioned: pass time_emb")
            scale_shift = rearrange(self.mlp(time_emb), "b c -> b c 1 1 1").chunk(2, dim=1)

        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


def downsample(dim: int) -> nn.Conv3d:
    """Halve H and W, keep the slices: (B, C, F, H, W) -> (B, C, F, H/2, W/2)."""
    return nn.Conv3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


def upsample(dim: int) -> nn.ConvTranspose3d:
    """Double H and W, keep the slices: (B, C, F, H, W) -> (B, C, F, 2H, 2W)."""
    return nn.ConvTranspose3d(dim, dim, (1, 4, 4), (1, 2, 2), (0, 1, 1))


class SliceTokens(nn.Module):
    """Run ``fn`` on the pixels of each slice as a token sequence.

    (B, C, F, H, W) -> (B, F, H*W, C) -> fn -> back to (B, C, F, H, W).
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, _, height, width = x.shape
        tokens = rearrange(x, "b c f h w -> b f (h w) c")
        tokens = self.fn(tokens)
        return rearrange(tokens, "b f (h w) c -> b c f h w", h=height, w=width)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the last-but-one axis of (..., N, dim).

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` with the default
    scale 1/sqrt(dim_head); the probabilities are never materialised.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Linear(dim, hidden * 3, bias=False)
        self.to_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(part, "... n (h d) -> ... h n d", h=self.heads) for part in self.to_qkv(x).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "... h n d -> ... n (h d)"))


class CrossAttentionProcessor:
    """Compute per-slice text cross-attention for a :class:`CrossAttention` layer.

    The probabilities are materialised explicitly, (B, F, heads, H*W, T), so a
    subclass can read them in :meth:`observe` without changing the arithmetic. They
    are small: the layer runs at the U-Net's middle resolution (for MedSyn's
    official model 64 slices x 8 heads x 64 pixels x 192 tokens, 25 MB in float32
    at batch 1).
    """

    def __call__(
        self,
        attention: "CrossAttention",
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, _, slices, height, width = x.shape
        heads = attention.heads

        # 1. Queries from each slice's pixels, keys and values from the text, which
        #    is the same for every slice of a volume.
        q = attention.to_q(rearrange(x, "b c f h w -> (b f) c h w"))
        q = rearrange(q, "(b f) (n d) x y -> b f n (x y) d", b=batch, n=heads)
        k, v = attention.to_kv(context).chunk(2, dim=-1)
        k = rearrange(k, "b t (n d) -> b n t d", n=heads)
        v = rearrange(v, "b t (n d) -> b n t d", n=heads)

        # 2. Probabilities over the T token positions for every pixel of every slice.
        scores = torch.einsum("bfnid,bnjd->bfnij", q, k) * attention.scale
        if context_mask is not None:
            # Masked positions get probability 0, so the maps of the others still sum to 1.
            scores = scores.masked_fill(~context_mask[:, None, None, None, :], float("-inf"))
        probabilities = scores.softmax(dim=-1)
        self.observe(attention, probabilities)

        # 3. Mix the values and project back to the image channels.
        out = torch.einsum("bfnij,bnjd->bfnid", probabilities, v)
        out = rearrange(out, "b f n (x y) d -> (b f) (n d) x y", x=height, y=width)
        out = attention.to_out(out)
        return rearrange(out, "(b f) c h w -> b c f h w", b=batch, f=slices)

    def observe(self, attention: "CrossAttention", probabilities: torch.Tensor) -> None:
        """Receive the probabilities (B, F, heads, H*W, T) of one call; no-op here."""


class CrossAttention(nn.Module):
    """Per-slice cross-attention from image pixels to text token embeddings.

    Input x (B, C, F, H, W), context (B, T, cond_dim) and an optional bool
    context_mask (B, T), False at token positions no pixel may attend to; the
    output has x's shape.
    The arithmetic lives in :attr:`processor`, which a saliency capture swaps for
    one that records the probabilities.
    """

    def __init__(self, dim: int, cond_dim: int, *, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_q = nn.Conv2d(dim, hidden, 1, bias=False)
        self.to_kv = nn.Linear(cond_dim, hidden * 2, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)
        self.processor: CrossAttentionProcessor = CrossAttentionProcessor()

    def forward(
        self, x: torch.Tensor, *, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.processor(self, x, context, context_mask)
