"""Transformer backend: any local Hugging Face token-classification folder.

Steps of :meth:`TransformerBackend.extract`:

1. Tokenize with the folder's fast tokenizer, with character offsets, in windows
   of ``max_length`` tokens that overlap by ``stride`` tokens.
2. Predict one label per token; a word takes the label of its first sub-token
   (the "first" aggregation of the Hugging Face pipeline).
3. Group words into spans: "B-X" starts a span, "I-X" or a bare "X" continues a
   span of type X, "O" ends it. A span runs from its first word's first character
   to its last word's last character.
4. Map each span type to FINDING, BODY_PART or MODIFIER with ``label_map``; types
   missing from the map are dropped and logged at debug level.
5. Assert with the ConText rules of :mod:`medsyn_xai.ner.assertion`; a type listed
   in ``assertion_hints`` (RadGraph's OBS-DA and OBS-U) overrides the rules.

The folder is read with ``local_files_only=True``, so nothing is downloaded;
run with ``HF_HUB_OFFLINE=1`` as well.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog

from medsyn_xai.ner.assertion import assertion_rules_digest, assign_assertions
from medsyn_xai.ner.entity import ASSERTIONS, LABELS, Assertion, Entity, Label

__all__ = [
    "LABEL_SCHEMES",
    "RADGRAPH_ASSERTION_HINTS",
    "RADGRAPH_LABELS",
    "STANZA_RADIOLOGY_LABELS",
    "TransformerBackend",
]

log = structlog.get_logger(__name__)

RADGRAPH_LABELS: dict[str, Label] = {
    "ANAT-DP": "BODY_PART",
    "OBS-DP": "FINDING",
    "OBS-U": "FINDING",
    "OBS-DA": "FINDING",
}
"""RadGraph entity types: anatomy, and observations definitely present, uncertain
or definitely absent."""

RADGRAPH_ASSERTION_HINTS: dict[str, Assertion] = {"OBS-DA": "absent", "OBS-U": "uncertain"}
"""RadGraph types that carry their own assertion, which overrides the cue rules."""

STANZA_RADIOLOGY_LABELS: dict[str, Label] = {
    "ANATOMY": "BODY_PART",
    "ANATOMY_MODIFIER": "MODIFIER",
    "OBSERVATION": "FINDING",
    "OBSERVATION_MODIFIER": "MODIFIER",
}
"""Stanza radiology NER types. Its UNCERTAINTY spans are hedge words ("likely"),
which are not entities here: the assertion rules read them as cues."""

LABEL_SCHEMES: dict[str, tuple[dict[str, Label], dict[str, Assertion]]] = {
    "medsyn": ({label: label for label in LABELS}, {}),
    "radgraph": (RADGRAPH_LABELS, RADGRAPH_ASSERTION_HINTS),
    "stanza": (STANZA_RADIOLOGY_LABELS, {}),
}
"""Named (label_map, assertion_hints) pairs; "medsyn" is a model trained on this
package's own three labels."""

_TAG_PREFIX = re.compile(r"^[BIESLU]-")


@dataclass
class _Word:
    start: int
    end: int
    tag: str


def _split_tag(tag: str) -> tuple[str, str]:
    """Split "B-OBS" into ("B", "OBS"); a bare type continues like "I-"."""
    if tag == "O":
        return "O", ""
    if _TAG_PREFIX.match(tag):
        prefix = "B" if tag[0] in "BSU" else "I"
        return prefix, tag[2:]
    return "I", tag


def _hash_folder(folder: Path) -> str:
    """SHA-256 over config.json and every weight file of a model folder."""
    digest = hashlib.sha256()
    weights = [*sorted(folder.glob("*.safetensors")), *sorted(folder.glob("*.bin"))]
    paths = [folder / "config.json", *weights]
    for path in paths:
        if not path.is_file():
            continue
        digest.update(path.name.encode("utf-8"))
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class TransformerBackend:
    """Entity extraction with a local token-classification model.

    Args:
        model_dir: Hugging Face folder with config.json, weights and a fast
            tokenizer (one that returns character offsets).
        label_map: model entity type (B-/I- prefix removed) -> "FINDING",
            "BODY_PART" or "MODIFIER"; or a scheme name from ``LABEL_SCHEMES``
            ("medsyn", "radgraph", "stanza"). Default "medsyn".
        assertion_hints: model entity type -> assertion that overrides the cue
            rules. None takes the scheme's hints when ``label_map`` is a scheme
            name, else none. Default None.
        max_length: tokens per window, specials included; None uses the smaller
            of the tokenizer's and the model's position limit. Default None.
        stride: tokens shared by consecutive windows of a long prompt; None uses
            32 or a quarter of ``max_length``, whichever is smaller. Default None.
        device: torch device the model runs on. Default "cpu".

    Attributes:
        name: "transformer".
        version: the folder name plus 12 hex digits of a SHA-256 over config.json,
            the weight files, the label map, the hints and the assertion rules.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: an unknown scheme name, a label or assertion outside the
            allowed values, a slow tokenizer, or a folder transformers cannot load.
    """

    name = "transformer"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        label_map: str | Mapping[str, str] = "medsyn",
        assertion_hints: Mapping[str, str] | None = None,
        max_length: int | None = None,
        stride: int | None = None,
        device: str = "cpu",
    ) -> None:
        folder = Path(model_dir).expanduser()
        if not folder.is_dir():
            message = (
                f"token-classification model folder not found: {folder}; "
                "pass model_dir= a folder written by save_pretrained"
            )
            raise FileNotFoundError(message)
        if not (folder / "config.json").is_file():
            message = (
                f"no config.json in token-classification model folder {folder}; "
                "save the model there with save_pretrained"
            )
            raise FileNotFoundError(message)

        self.label_map, self.assertion_hints = _resolve_scheme(label_map, assertion_hints)
        self.folder = folder
        self.device = device
        self._tokenizer, self._model = _load(folder, device)

        position_limit = int(getattr(self._model.config, "max_position_embeddings", 512))
        tokenizer_limit = int(min(self._tokenizer.model_max_length, position_limit))
        self.max_length = tokenizer_limit if max_length is None else max_length
        if not 8 <= self.max_length <= position_limit:
            message = (
                f"invalid max_length {self.max_length}: "
                f"use 8 to {position_limit} tokens for {folder}"
            )
            raise ValueError(message)
        if stride is None:
            stride = min(32, self.max_length // 4)
        if not 0 <= stride < self.max_length // 2:
            message = (
                f"invalid stride {stride}: use 0 to {self.max_length // 2 - 1} tokens "
                f"for max_length {self.max_length}"
            )
            raise ValueError(message)
        self.stride = stride

        tables = json.dumps([self.label_map, self.assertion_hints], sort_keys=True)
        digest = hashlib.sha256(
            (_hash_folder(folder) + tables + assertion_rules_digest()).encode("utf-8")
        ).hexdigest()
        self.version = f"{folder.name}+{digest[:12]}"

    def extract(self, text: str) -> list[Entity]:
        """Find the FINDING, BODY_PART and MODIFIER entities of ``text``.

        Args:
            text: the prompt, any length; long prompts run in overlapping windows.

        Returns:
            Entities sorted by start offset, not yet aligned to tokens.
        """
        if not text.strip():
            return []

        words = self._predict_words(text)
        spans = self._group_words(words)
        assertions = assign_assertions(text, [(start, end) for start, end, _ in spans])

        entities = []
        for (start, end, entity_type), rule_assertion in zip(spans, assertions, strict=True):
            entities.append(
                Entity(
                    text=text[start:end],
                    label=self.label_map[entity_type],
                    start=start,
                    end=end,
                    assertion=self.assertion_hints.get(entity_type, rule_assertion),
                    backend=self.name,
                    backend_version=self.version,
                )
            )
        return entities

    def _predict_words(self, text: str) -> list[_Word]:
        """Return one tagged word per tokenizer word, in order of position."""
        import torch

        encoding = self._tokenizer(
            text,
            return_offsets_mapping=True,
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
        )
        id2label = self._model.config.id2label

        words: dict[int, _Word] = {}
        for window in range(len(encoding["input_ids"])):
            input_ids = torch.tensor([encoding["input_ids"][window]], device=self.device)
            with torch.inference_mode():
                logits = self._model(input_ids=input_ids).logits  # (1, L, n_labels)
            predicted = logits[0].argmax(dim=-1).tolist()

            offsets = encoding["offset_mapping"][window]
            for position, word_id in enumerate(encoding.word_ids(window)):
                if word_id is None:
                    continue
                start, end = offsets[position]
                if word_id not in words:
                    # The first sub-token decides; an overlap window never relabels a word.
                    words[word_id] = _Word(start=start, end=end, tag=id2label[predicted[position]])
                else:
                    words[word_id].start = min(words[word_id].start, start)
                    words[word_id].end = max(words[word_id].end, end)

        return sorted(words.values(), key=lambda word: word.start)

    def _group_words(self, words: list[_Word]) -> list[tuple[int, int, str]]:
        """Join tagged words into (start, end, entity type) spans of mapped types."""
        spans: list[tuple[int, int, str]] = []
        current: tuple[int, int, str] | None = None
        for word in words:
            prefix, entity_type = _split_tag(word.tag)
            if current is not None and prefix == "I" and entity_type == current[2]:
                current = (current[0], word.end, entity_type)
                continue
            if current is not None:
                spans.append(current)
            current = None if prefix == "O" else (word.start, word.end, entity_type)
        if current is not None:
            spans.append(current)

        mapped_spans = []
        for start, end, entity_type in spans:
            if entity_type not in self.label_map:
                log.debug("ner.transformer.unmapped_label", label=entity_type, start=start, end=end)
                continue
            mapped_spans.append((start, end, entity_type))
        return mapped_spans


def _resolve_scheme(
    label_map: str | Mapping[str, str], assertion_hints: Mapping[str, str] | None
) -> tuple[dict[str, Label], dict[str, Assertion]]:
    """Validate the label map and hints, expanding a scheme name."""
    if isinstance(label_map, str):
        if label_map not in LABEL_SCHEMES:
            message = (
                f"unknown label scheme {label_map!r}: "
                f"use one of {', '.join(LABEL_SCHEMES)} or pass a dict"
            )
            raise ValueError(message)
        table, scheme_hints = LABEL_SCHEMES[label_map]
        label_map = table
        if assertion_hints is None:
            assertion_hints = scheme_hints

    mapped: dict[str, Label] = {}
    for entity_type, label in label_map.items():
        if label not in LABELS:
            message = (
                f"label_map[{entity_type!r}] = {label!r} is invalid: use one of {', '.join(LABELS)}"
            )
            raise ValueError(message)
        mapped[_split_tag(entity_type)[1] or entity_type] = cast(Label, label)

    hints: dict[str, Assertion] = {}
    for entity_type, assertion in (assertion_hints or {}).items():
        if assertion not in ASSERTIONS:
            message = (
                f"assertion_hints[{entity_type!r}] = {assertion!r} is invalid: "
                f"use one of {', '.join(ASSERTIONS)}"
            )
            raise ValueError(message)
        hints[_split_tag(entity_type)[1] or entity_type] = cast(Assertion, assertion)
    return mapped, hints


def _load(folder: Path, device: str) -> tuple[Any, Any]:
    """Load tokenizer and model from ``folder`` without touching the network."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"cannot load token-classification model from {folder}: {first_line}"
        raise ValueError(message) from error

    if not getattr(tokenizer, "is_fast", False):
        message = (
            f"tokenizer in {folder} gives no character offsets: "
            "save a fast tokenizer (tokenizer.json) there"
        )
        raise ValueError(message)

    model.to(device)
    model.eval()
    return tokenizer, model
