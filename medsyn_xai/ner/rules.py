"""Rules backend: lexicon phrase matching and measurement patterns, offline.

Steps of :meth:`RulesBackend.extract`:

1. Tokenize with ``spacy.blank("en")`` and match every lexicon phrase with a
   PhraseMatcher on lower-cased tokens; find measurements with a regular
   expression on the raw text.
2. Keep the longest candidate where candidates overlap, and of two equally long
   ones the leftmost.
3. Join a laterality MODIFIER to a BODY_PART that follows it after whitespace
   only ("right" + "upper lobe" -> "right upper lobe").
4. Assert every entity with the ConText rules of :mod:`medsyn_xai.ner.assertion`.

See :mod:`medsyn_xai.ner.lexicon` for the boundary conventions.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, cast

from medsyn_xai.ner.assertion import assertion_rules_digest, assign_assertions
from medsyn_xai.ner.entity import Entity, Label
from medsyn_xai.ner.lexicon import Lexicon, build_lexicon

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.matcher import PhraseMatcher
    from spacy.tokenizer import Tokenizer

__all__ = ["RULES_VERSION", "RulesBackend"]

RULES_VERSION = "1.0"
"""Version of the matching and assertion code. Raise it when that code changes; a
change to the lexicon or the cue tables already changes the digest part."""

_Candidate = tuple[int, int, Label]


class RulesBackend:
    """Entity extraction from the chest CT lexicon, with no model and no network.

    Args:
        lexicon: the vocabulary to match; None uses :func:`build_lexicon`.

    Attributes:
        name: "rules".
        version: ``RULES_VERSION`` plus the first 12 hex digits of a SHA-256 over
            the lexicon and the assertion cue tables, for example
            "1.0+3fa9c2d81b0e", so an edit to either invalidates cached entities.
    """

    name = "rules"

    def __init__(self, lexicon: Lexicon | None = None) -> None:
        import spacy
        from spacy.matcher import PhraseMatcher

        self.lexicon = build_lexicon() if lexicon is None else lexicon
        self._nlp: Language = spacy.blank("en")
        self._tokenizer = cast("Tokenizer", self._nlp.tokenizer)
        self._drop_colliding_exceptions()
        self._matcher: PhraseMatcher = PhraseMatcher(self._nlp.vocab, attr="LOWER")
        self._label_by_key: dict[int, Label] = {}
        for label, phrases in self.lexicon.phrases.items():
            self._label_by_key[self._nlp.vocab.strings.add(label)] = label
            self._matcher.add(label, list(self._tokenizer.pipe(phrases)))
        self._measurement = re.compile(self.lexicon.measurement_pattern, re.IGNORECASE)

        digest = _combined_digest(self.lexicon.digest, assertion_rules_digest())
        self.version = f"{RULES_VERSION}+{digest[:12]}"

    def extract(self, text: str) -> list[Entity]:
        """Find the FINDING, BODY_PART and MODIFIER entities of ``text``.

        Args:
            text: the prompt, any length and script; blank text gives no entities.

        Returns:
            Entities sorted by start offset, not yet aligned to tokens
            (``token_indices=()``, ``covered=None``).
        """
        if not text.strip():
            return []

        candidates = self._match_phrases(text) + self._match_measurements(text)
        spans = _join_laterality(text, _resolve_overlaps(candidates), self.lexicon.laterality)
        assertions = assign_assertions(text, [(start, end) for start, end, _ in spans])

        entities = [
            Entity(
                text=text[start:end],
                label=label,
                start=start,
                end=end,
                assertion=assertion,
                backend=self.name,
                backend_version=self.version,
            )
            for (start, end, label), assertion in zip(spans, assertions, strict=True)
        ]
        return entities

    def _drop_colliding_exceptions(self) -> None:
        """Remove tokenizer exceptions that hide a lexicon word, such as "Mass." (Massachusetts).

        spaCy keeps an exception like "Mass." as one token, so the phrase "mass"
        would not match the report sentence "Mass." without this.
        """
        words = {
            word
            for phrases in self.lexicon.phrases.values()
            for phrase in phrases
            for word in phrase.split()
        }
        rules = self._tokenizer.rules or {}
        self._tokenizer.rules = {
            key: value for key, value in rules.items() if key.rstrip(".").lower() not in words
        }

    def _match_phrases(self, text: str) -> list[_Candidate]:
        # spaCy's max_length protects the memory of parser and NER components, and a
        # blank pipeline only tokenizes, so a long prompt is safe.
        self._nlp.max_length = max(self._nlp.max_length, len(text) + 1)
        doc = self._nlp.make_doc(text)
        candidates: list[_Candidate] = []
        for match_key, token_start, token_end in self._matcher(doc):
            span = doc[token_start:token_end]
            candidates.append((span.start_char, span.end_char, self._label_by_key[match_key]))
        return candidates

    def _match_measurements(self, text: str) -> list[_Candidate]:
        return [
            (match.start(), match.end(), "MODIFIER") for match in self._measurement.finditer(text)
        ]


def _combined_digest(*digests: str) -> str:
    return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()


def _resolve_overlaps(candidates: list[_Candidate]) -> list[_Candidate]:
    """Keep the longest of overlapping candidates, then the leftmost; sort by start."""
    text_length = max((end for _, end, _ in candidates), default=0)
    occupied = bytearray(text_length)
    chosen: list[_Candidate] = []
    for start, end, label in sorted(candidates, key=lambda item: (item[0] - item[1], item[0])):
        if any(occupied[start:end]):
            continue
        chosen.append((start, end, label))
        occupied[start:end] = b"\x01" * (end - start)
    return sorted(chosen)


def _join_laterality(
    text: str, spans: list[_Candidate], laterality: frozenset[str]
) -> list[_Candidate]:
    """Merge a laterality MODIFIER into the BODY_PART right after it."""
    joined: list[_Candidate] = []
    index = 0
    while index < len(spans):
        start, end, label = spans[index]
        if index + 1 < len(spans):
            next_start, next_end, next_label = spans[index + 1]
            is_laterality = label == "MODIFIER" and text[start:end].lower() in laterality
            gap = text[end:next_start]
            if is_laterality and next_label == "BODY_PART" and gap and gap.isspace():
                joined.append((start, next_end, "BODY_PART"))
                index += 2
                continue
        joined.append((start, end, label))
        index += 1
    return joined
