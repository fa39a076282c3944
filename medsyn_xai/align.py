"""Attach encoder token positions to entities by character offsets.

A token covers an entity when the token's character span ``[start, end)``
overlaps the entity's. Token strings are never compared, so any tokenizer that
reports character offsets works (the tests cover WordPiece ``##`` pieces and
byte-level BPE), and two occurrences of one word get different tokens. Special
and padding tokens never cover anything.

Byte-level BPE tokenizers without offset trimming report a token such as
``"Ġnodule"`` with a span that starts on the space before the word. The overlap
rule already handles this: a token whose span holds only the space before an
entity ends where the entity starts, so it does not overlap it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from medsyn_xai.ner.entity import Entity
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["align_entities"]


def align_entities(entities: Sequence[Entity], tokens: Sequence[TokenRecord]) -> list[Entity]:
    """Return copies of ``entities`` with ``token_indices`` and ``covered`` set.

    Args:
        entities: entities with character offsets into the encoded prompt.
        tokens: the encoder's token records for that prompt, padding included;
            ``TokenRecord.index`` is what goes into ``token_indices``.

    Returns:
        One entity per input entity, in the same order; none is dropped.
        ``token_indices`` lists, ascending, the indices of the non-special tokens
        whose span overlaps the entity. ``covered`` is True when there is at least
        one such token. It is False when there is none, which happens when the
        entity lies past the last token of a truncated prompt. An entity cut by the
        truncation keeps the tokens it still has and is covered.
    """
    content = [token for token in tokens if not token.special and token.end > token.start]
    starts = np.array([token.start for token in content], dtype=np.int64)
    ends = np.array([token.end for token in content], dtype=np.int64)
    indices = np.array([token.index for token in content], dtype=np.int64)

    aligned = []
    for entity in entities:
        overlaps = (starts < entity.end) & (ends > entity.start)
        token_indices = tuple(sorted(int(index) for index in indices[overlaps]))
        aligned.append(
            dataclasses.replace(entity, token_indices=token_indices, covered=bool(token_indices))
        )
    return aligned
