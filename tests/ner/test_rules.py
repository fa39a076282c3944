"""Rules backend: boundary conventions, robustness and speed."""

from __future__ import annotations

import dataclasses
import time

import pytest

from medsyn_xai.ner.entity import Entity
from medsyn_xai.ner.lexicon import build_lexicon
from medsyn_xai.ner.rules import RULES_VERSION, RulesBackend


@pytest.fixture(scope="module")
def backend() -> RulesBackend:
    return RulesBackend()


def triples(entities: list[Entity]) -> list[tuple[str, str, str]]:
    return [(entity.text, entity.label, entity.assertion) for entity in entities]


def test_lobe_with_laterality_is_one_body_part(backend: RulesBackend) -> None:
    entities = backend.extract("Nodule in the right upper lobe.")

    assert triples(entities) == [
        ("Nodule", "FINDING", "present"),
        ("right upper lobe", "BODY_PART", "present"),
    ]
    assert (entities[1].start, entities[1].end) == (14, 30)


def test_laterality_before_finding_is_modifier(backend: RulesBackend) -> None:
    entities = backend.extract("Small left pleural effusion.")

    assert triples(entities) == [
        ("Small", "MODIFIER", "present"),
        ("left", "MODIFIER", "present"),
        ("pleural effusion", "FINDING", "present"),
    ]


def test_laterality_joins_anatomy_adjective(backend: RulesBackend) -> None:
    entities = backend.extract("Enlarged right hilar lymph nodes.")

    assert triples(entities) == [
        ("Enlarged", "MODIFIER", "present"),
        ("right hilar", "BODY_PART", "present"),
        ("lymph nodes", "BODY_PART", "present"),
    ]


def test_segment_of_lobe_is_two_entities(backend: RulesBackend) -> None:
    entities = backend.extract("Opacity in the posterior segment of the right lower lobe.")

    assert [entity.text for entity in entities] == [
        "Opacity",
        "posterior segment",
        "right lower lobe",
    ]


def test_longest_match_wins(backend: RulesBackend) -> None:
    entities = backend.extract("Interlobular septal thickening and pleural effusion.")

    assert [(entity.text, entity.label) for entity in entities] == [
        ("Interlobular septal thickening", "FINDING"),
        ("pleural effusion", "FINDING"),
    ]


@pytest.mark.parametrize(
    "text",
    ["ground-glass opacity", "ground glass opacity", "Ground-Glass Opacities", "GGO", "GGOs"],
)
def test_ground_glass_spellings(backend: RulesBackend, text: str) -> None:
    entities = backend.extract(f"Bilateral {text}.")

    assert [(entity.text, entity.label) for entity in entities] == [
        ("Bilateral", "MODIFIER"),
        (text, "FINDING"),
    ]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("No pnuemothorax.", "pnuemothorax"),
        ("Small effussion.", "effussion"),
        ("Bilateral pleural effussions.", "pleural effussions"),
        ("Bibasilar atelectesis.", "atelectesis"),
    ],
)
def test_common_misspellings(backend: RulesBackend, text: str, found: str) -> None:
    findings = [entity.text for entity in backend.extract(text) if entity.label == "FINDING"]

    assert findings == [found]


@pytest.mark.parametrize(
    ("text", "measurement"),
    [
        ("A 9 mm nodule.", "9 mm"),
        ("A 1.2 x 0.8 cm nodule.", "1.2 x 0.8 cm"),
        ("A 3-cm mass.", "3-cm"),
        ("Nodule, 12mm.", "12mm"),
    ],
)
def test_measurement_is_modifier(backend: RulesBackend, text: str, measurement: str) -> None:
    modifiers = [entity.text for entity in backend.extract(text) if entity.label == "MODIFIER"]

    assert modifiers == [measurement]


def test_repeated_word_gives_separate_entities(backend: RulesBackend) -> None:
    text = "Nodule in the RUL and a second nodule in the LLL."

    nodules = [entity for entity in backend.extract(text) if entity.label == "FINDING"]

    assert [(entity.start, entity.end) for entity in nodules] == [(0, 6), (31, 37)]


def test_abbreviation_sentence_matches(backend: RulesBackend) -> None:
    assert triples(backend.extract("Mass.")) == [("Mass", "FINDING", "present")]


def test_negation_list(backend: RulesBackend) -> None:
    entities = backend.extract("No pleural effusion, pneumothorax or cardiomegaly.")

    assert [entity.assertion for entity in entities] == ["absent", "absent", "absent"]


@pytest.mark.parametrize("text", ["", " ", "\n\t  \n"])
def test_blank_text_gives_no_entities(backend: RulesBackend, text: str) -> None:
    assert backend.extract(text) == []


def test_text_without_entities(backend: RulesBackend) -> None:
    assert backend.extract("Comparison: CT dated 2023-01-01.") == []


def test_emoji_and_other_scripts_keep_offsets(backend: RulesBackend) -> None:
    text = "😀 Small nodule 肺结节 in the RUL; Ελένη: no pnuemothorax 🫁."

    entities = backend.extract(text)

    assert [entity.text for entity in entities] == ["Small", "nodule", "RUL", "pnuemothorax"]
    for entity in entities:
        assert text[entity.start : entity.end] == entity.text


def test_long_prompt_under_one_second(backend: RulesBackend) -> None:
    sentence = "Stable 4 mm nodule in the right upper lobe; no pleural effusion or pneumothorax. "
    text = (sentence * (10_000 // len(sentence) + 1))[:10_000]

    started = time.perf_counter()
    entities = backend.extract(text)
    elapsed = time.perf_counter() - started

    assert elapsed < 1.0
    assert len(entities) > 700
    assert [entity.start for entity in entities] == sorted(entity.start for entity in entities)
    for entity in entities:
        assert text[entity.start : entity.end] == entity.text


def test_entities_unaligned_with_version(backend: RulesBackend) -> None:
    (entity,) = backend.extract("Pneumothorax.")

    assert entity.backend == "rules"
    assert entity.backend_version == backend.version
    assert entity.token_indices == ()
    assert entity.covered is None


def test_version_tracks_lexicon(backend: RulesBackend) -> None:
    lexicon = build_lexicon()
    phrases = dict(lexicon.phrases)
    phrases["FINDING"] = tuple(phrase for phrase in phrases["FINDING"] if phrase != "nodule")

    changed = RulesBackend(dataclasses.replace(lexicon, phrases=phrases))

    assert backend.version.startswith(f"{RULES_VERSION}+")
    assert RulesBackend().version == backend.version
    assert changed.version != backend.version
    assert [entity.text for entity in changed.extract("nodule and nodules")] == ["nodules"]
