"""Hide the words of negated findings from the text encoder and the denoiser.

Cross-attention adds to every pixel a mix of the token embeddings it attends to.
The embedding of "consolidation" in "No consolidation in the left upper lobe"
stays close to the one in "Consolidation in the left upper lobe", and the
negation cue is a separate token, so a small denoiser draws the lesion for both.
Before sampling, and for every report in training, the rules NER backend finds
the entities of the prompt. The tokens of each entity it marks absent (finding,
body part and modifier alike) are hidden twice. The text encoder's
self-attention leaves them out, so the embeddings of the other tokens do not
carry them, and the denoiser's cross-attention mask excludes them. The model
then reads "No consolidation in the left upper lobe." as it reads a normal
report. The cue words stay visible.

The rules backend is used whatever the value of ``ner.backend``, because the
masks seen in training and at sampling must come from the same extractor. A
hidden token gets no attention, so its token map is zero everywhere and so is
the heatmap of a negated entity. The maps of the other tokens still sum to one
at every voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsyn_xai.align import align_entities
from medsyn_xai.ner.backends import NERBackend, get_backend
from medsyn_xai.text.encoder import EncodedPrompt, TextEncoder
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["NegationMasker"]


class NegationMasker:
    """Finder of the tokens of a prompt's negated entities, for hiding them from the encoder and the denoiser.

    Args:
        backend: entity extractor; None (default) builds the rules backend.
    """

    def __init__(self, backend: NERBackend | None = None) -> None:
        self.backend = backend if backend is not None else get_backend("rules")

    def hidden_tokens(self, prompt: str, tokens: Sequence[TokenRecord]) -> tuple[int, ...]:
        """Return the ascending token indices covered by entities whose assertion is "absent"."""
        absent = [entity for entity in self.backend.extract(prompt) if entity.assertion == "absent"]
        indices = {index for entity in align_entities(absent, tokens) for index in entity.token_indices}
        return tuple(sorted(indices))

    def mask(self, prompt: str, tokens: Sequence[TokenRecord], attention_mask: torch.Tensor) -> torch.Tensor:
        """Return a copy of the bool attention mask, (T,) or (1, T), False at the hidden tokens."""
        masked = attention_mask.clone()
        hidden = list(self.hidden_tokens(prompt, tokens))
        if hidden:
            masked[..., hidden] = False
        return masked

    def encode(self, encoder: TextEncoder, prompt: str) -> EncodedPrompt:
        """Encode ``prompt`` with the tokens of its negated entities hidden (see the module docstring)."""
        tokens = encoder.tokenize(prompt)[0]
        return encoder.encode(prompt, hidden=self.hidden_tokens(prompt, tokens))
