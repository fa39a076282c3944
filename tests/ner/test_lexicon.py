"""Lexicon expansion, plural rules and the measurement pattern."""

from __future__ import annotations

import dataclasses

import pytest

from medsyn_xai.ner.entity import LABELS
from medsyn_xai.ner.lexicon import MEASUREMENT_PATTERN, build_lexicon, pluralize


@pytest.mark.parametrize(
    ("singular", "plural"),
    [
        ("nodule", "nodules"),
        ("mass", "masses"),
        ("opacity", "opacities"),
        ("lymph node", "lymph nodes"),
        ("bronchus", "bronchi"),
        ("hilum", "hila"),
        ("bulla", "bullae"),
        ("apex", "apices"),
        ("pneumothorax", "pneumothoraces"),
        ("metastasis", "metastases"),
        ("vertebral body", "vertebral bodies"),
        ("hernia", "hernias"),
        ("GGO", "GGOs"),
    ],
)
def test_pluralize(singular: str, plural: str) -> None:
    assert pluralize(singular) == plural


def test_every_label_has_phrases() -> None:
    lexicon = build_lexicon()

    assert set(lexicon.phrases) == set(LABELS)
    for label in LABELS:
        assert len(lexicon.phrases[label]) > 50


def test_phrases_lower_case_and_unique_across_labels() -> None:
    lexicon = build_lexicon()

    seen: set[str] = set()
    for phrases in lexicon.phrases.values():
        for phrase in phrases:
            assert phrase == phrase.lower()
            assert phrase not in seen
            seen.add(phrase)


@pytest.mark.parametrize(
    ("phrase", "label"),
    [
        ("ground-glass opacity", "FINDING"),
        ("ground glass opacities", "FINDING"),
        ("pnuemothorax", "FINDING"),
        ("pleural effussions", "FINDING"),
        ("nodules", "FINDING"),
        ("right upper lobe", None),
        ("upper lobe", "BODY_PART"),
        ("rul", "BODY_PART"),
        ("lung bases", "BODY_PART"),
        ("part solid", "MODIFIER"),
        ("right-sided", "MODIFIER"),
        ("resolved", None),
    ],
)
def test_phrase_labels(phrase: str, label: str | None) -> None:
    lexicon = build_lexicon()

    if label is None:
        with pytest.raises(KeyError):
            lexicon.label_of(phrase)
    else:
        assert lexicon.label_of(phrase) == label


def test_laterality_is_modifier() -> None:
    lexicon = build_lexicon()

    assert {"left", "right", "bilateral", "right sided"} <= lexicon.laterality
    assert lexicon.laterality <= set(lexicon.phrases["MODIFIER"])


def test_digest_changes_with_phrases() -> None:
    lexicon = build_lexicon()
    phrases = dict(lexicon.phrases)
    phrases["FINDING"] = (*phrases["FINDING"], "made-up finding")

    changed = dataclasses.replace(lexicon, phrases=phrases)

    assert changed.digest != lexicon.digest
    assert build_lexicon().digest == lexicon.digest


@pytest.mark.parametrize(
    "text",
    [
        "9 mm",
        "12mm",
        "1.2 x 0.8 cm",
        "1.2x0.8 cm",
        "1.2 × 0.8 cm",  # noqa: RUF001  # the multiplication sign is the case tested
        "3-cm",
        "3.4 cm x 2.9 cm x 2.5 cm",
        "2 by 3 cm",
        "8 millimeters",
        "4 CM",
    ],
)
def test_measurement_matches_whole(text: str) -> None:
    match = MEASUREMENT_PATTERN.search(f"a {text} nodule")

    assert match is not None
    assert match.group() == text


@pytest.mark.parametrize(
    "text", ["T8 vertebra", "2023-01-01", "in 12 months", "cm", "5 mmHg", "V1.2 cm"]
)
def test_measurement_rejects(text: str) -> None:
    assert MEASUREMENT_PATTERN.search(text) is None
