"""Token grounding loss: pull the cross-attention of a finding's words into its region.

On phantoms the region of every drawn finding is known, and so are the characters
of its mentions in the report. For one middle cross-attention layer and one
finding, with ``a`` the attention of the finding's tokens (summed over those
tokens, averaged over heads) at every pixel of every slice,

    loss = 1 - sum of a inside the region / sum of a over the volume

which is 0 when the words attend only inside the finding and 1 when they attend
only outside it. The training loss adds the mean over layers and findings,
times ``train.grounding_weight``. Samples whose text was dropped for
classifier-free guidance have no words to ground and are left out.

The idea follows TokenCompose (Wang et al., arXiv:2312.03626), which supervises
the cross-attention of a text-to-image diffusion model with segmentation masks
of the objects its prompt names. Here it acts on the layers the saliency
capture reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from medsyn_xai.model.layers import CrossAttention, CrossAttentionProcessor
from medsyn_xai.model.unet import Unet3D
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["grounding_loss", "record_attention", "region_on_attention_grid", "span_token_mask"]


class _KeepingProcessor(CrossAttentionProcessor):
    """Processor that appends each call's probabilities, graph included, to a list."""

    def __init__(self, recorded: list[torch.Tensor], previous: CrossAttentionProcessor) -> None:
        self.recorded = recorded
        self.previous = previous

    def observe(self, attention: CrossAttention, probabilities: torch.Tensor) -> None:
        self.recorded.append(probabilities)
        self.previous.observe(attention, probabilities)


@contextmanager
def record_attention(model: Unet3D) -> Iterator[list[torch.Tensor]]:
    """Keep the probabilities of the middle cross-attention layers for the forward passes inside the block.

    Yields a list that receives one float (B, F, heads, h*w, T) tensor per layer
    call, in call order, without detaching it, so a loss on it trains the model.
    The previous processors are restored on exit, also on error.
    """
    layers = model.cross_attention_layers()
    previous = [layer.processor for layer in layers]
    recorded: list[torch.Tensor] = []
    for layer, processor in zip(layers, previous):
        layer.processor = _KeepingProcessor(recorded, processor)
    try:
        yield recorded
    finally:
        for layer, processor in zip(layers, previous):
            layer.processor = processor


def span_token_mask(spans: Sequence[tuple[int, int]], tokens: Sequence[TokenRecord]) -> torch.Tensor:
    """Return a bool (T,) mask of the non-special tokens that overlap any character span ``(start, end)``."""
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    for token in tokens:
        if token.special:
            continue
        if any(token.start < end and token.end > start for start, end in spans):
            mask[token.index] = True
    return mask


def region_on_attention_grid(region: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool a bool (D, H, W) region in-plane by ``factor`` and flatten it to (D, H/factor * W/factor).

    The pixel order matches the probabilities' h*w axis (rows of H first).
    """
    pooled = F.max_pool3d(region.float()[None, None], kernel_size=(1, factor, factor))[0, 0] > 0
    return pooled.flatten(start_dim=1)


def grounding_loss(
    probabilities: Sequence[torch.Tensor],
    token_masks: torch.Tensor,
    regions: torch.Tensor,
    sample_index: torch.Tensor,
) -> torch.Tensor:
    """Return the mean grounding loss over layers and findings (see the module docstring).

    Args:
        probabilities: per layer, float (B, F, heads, h*w, T) attention probabilities.
        token_masks: bool (N, T), the tokens of each of N findings.
        regions: bool (N, F, h*w), each finding's region on the attention grid.
        sample_index: int64 (N,), the batch sample each finding belongs to.

    Returns:
        A float32 scalar. With N == 0 or no layers it is 0 and carries no graph.
    """
    if token_masks.shape[0] == 0 or not probabilities:
        return torch.zeros(())
    if regions.shape[0] != token_masks.shape[0] or sample_index.shape[0] != token_masks.shape[0]:
        raise ValueError(
            f"token_masks, regions and sample_index have {token_masks.shape[0]}, {regions.shape[0]} and "
            f"{sample_index.shape[0]} rows: pass one row per finding in each"
        )

    weights = token_masks.to(probabilities[0].dtype)[:, None, None, :]  # (N, 1, 1, T)
    inside = regions.to(probabilities[0].dtype)  # (N, F, h*w)
    losses = []
    for layer_probabilities in probabilities:
        per_finding = layer_probabilities.mean(dim=2)[sample_index]  # (N, F, h*w, T)
        attention = (per_finding * weights).sum(dim=-1)  # (N, F, h*w)
        total = attention.sum(dim=(1, 2)).clamp_min(1e-12)
        losses.append(1.0 - (attention * inside).sum(dim=(1, 2)) / total)
    return torch.stack(losses).mean()
