"""Gold set integrity, scoring arithmetic and the rules backend's targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsyn_xai.ner import Entity, evaluate_ner, format_report, get_backend, load_gold
from medsyn_xai.ner.entity import ASSERTIONS, LABELS

GOLD_PATH = Path(__file__).resolve().parents[1] / "data" / "ner_gold.jsonl"


def read_gold_records() -> list[dict]:
    lines = GOLD_PATH.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_gold_set_size() -> None:
    records = read_gold_records()

    assert len(records) >= 120
    assert len({record["id"] for record in records}) == len(records)


def test_gold_span_text_matches_offsets() -> None:
    for record in read_gold_records():
        text = record["text"]
        for entity in record["entities"]:
            assert text[entity["start"] : entity["end"]] == entity["text"], record["id"]


def test_gold_labels_and_assertions_valid() -> None:
    for record in read_gold_records():
        for entity in record["entities"]:
            assert entity["label"] in LABELS, record["id"]
            assert entity["assertion"] in ASSERTIONS, record["id"]


def test_gold_spans_sorted_and_disjoint() -> None:
    for record in read_gold_records():
        previous_end = 0
        for entity in record["entities"]:
            assert entity["start"] >= previous_end, record["id"]
            previous_end = entity["end"]


def test_gold_covers_every_label_and_assertion() -> None:
    pairs = {
        (entity["label"], entity["assertion"])
        for record in read_gold_records()
        for entity in record["entities"]
    }

    for label in LABELS:
        for assertion in ASSERTIONS:
            assert (label, assertion) in pairs


def test_rules_backend_meets_targets() -> None:
    result = evaluate_ner(get_backend("rules"), GOLD_PATH)

    assert result["documents"] == len(read_gold_records())
    assert result["micro"]["f1"] >= 0.90
    assert result["assertion"]["accuracy"] >= 0.95
    for label in LABELS:
        assert result["labels"][label]["f1"] >= 0.85, label


class FixedBackend:
    """Backend that returns the same entities for every prompt."""

    name = "fixed"
    version = "0"

    def __init__(self, entities: list[Entity]) -> None:
        self.entities = entities

    def extract(self, text: str) -> list[Entity]:
        return list(self.entities)


def write_gold(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    return path


def entity(text: str, label: str, start: int, assertion: str = "present") -> Entity:
    return Entity(text, label, start, start + len(text), assertion, "fixed", "0")  # type: ignore[arg-type]


def test_scores_hand_computed(tmp_path: Path) -> None:
    gold = write_gold(
        tmp_path / "gold.jsonl",
        [
            {
                "id": "a",
                "text": "Small left pleural effusion.",
                "entities": [
                    {"start": 0, "end": 5, "label": "MODIFIER", "assertion": "present"},
                    {"start": 6, "end": 10, "label": "MODIFIER", "assertion": "present"},
                    {"start": 11, "end": 27, "label": "FINDING", "assertion": "present"},
                ],
            }
        ],
    )
    backend = FixedBackend(
        [
            entity("Small", "MODIFIER", 0),
            entity("left", "BODY_PART", 6),
            entity("pleural effusion", "FINDING", 11, assertion="absent"),
        ]
    )

    result = evaluate_ner(backend, gold)

    modifier = result["labels"]["MODIFIER"]
    assert (modifier["precision"], modifier["recall"]) == (1.0, 0.5)
    assert modifier["f1"] == pytest.approx(2 / 3)
    assert result["labels"]["BODY_PART"]["false_positives"] == 1
    assert result["labels"]["BODY_PART"]["f1"] == 0.0
    assert result["labels"]["FINDING"]["f1"] == 1.0
    assert result["micro"]["precision"] == pytest.approx(2 / 3)
    assert result["micro"]["recall"] == pytest.approx(2 / 3)
    assert result["assertion"] == {
        "accuracy": 0.5,
        "correct": 1,
        "matched": 2,
        "confusion": {
            "present": {"present": 1, "absent": 1, "uncertain": 0},
            "absent": {"present": 0, "absent": 0, "uncertain": 0},
            "uncertain": {"present": 0, "absent": 0, "uncertain": 0},
        },
    }
    assert sorted(error["kind"] for error in result["errors"]) == [
        "assertion",
        "missed",
        "spurious",
    ]


def test_format_report_table(tmp_path: Path) -> None:
    gold = write_gold(
        tmp_path / "gold.jsonl",
        [
            {
                "id": "a",
                "text": "Nodule.",
                "entities": [{"start": 0, "end": 6, "label": "FINDING", "assertion": "present"}],
            }
        ],
    )
    result = evaluate_ner(FixedBackend([entity("Nodule", "FINDING", 0)]), gold)

    report = format_report(result)

    lines = report.splitlines()
    assert lines[0] == "backend fixed 0, 1 prompts"
    assert lines[1].split() == ["label", "precision", "recall", "f1", "support", "tp", "fp", "fn"]
    assert lines[3].split() == ["FINDING", "1.000", "1.000", "1.000", "1", "1", "0", "0"]
    assert lines[6].split()[0] == "micro"
    assert lines[-1] == "assertion accuracy 1.000 (1 of 1 exactly matched entities)"


def test_load_gold_rejects_wrong_text(tmp_path: Path) -> None:
    gold = write_gold(
        tmp_path / "gold.jsonl",
        [
            {
                "id": "a",
                "text": "Small nodule.",
                "entities": [
                    {
                        "start": 0,
                        "end": 6,
                        "label": "FINDING",
                        "assertion": "present",
                        "text": "nodule",
                    }
                ],
            }
        ],
    )

    with pytest.raises(ValueError, match=r"gold.jsonl:1: entity text 'nodule' does not match"):
        load_gold(gold)


def test_load_gold_rejects_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "gold.jsonl"
    path.write_text('{"id": "a", "text": "x", "entities": []}\n{"id": \n', encoding="utf-8")

    with pytest.raises(ValueError, match=r"gold.jsonl:2: invalid JSON"):
        load_gold(path)


def test_load_gold_rejects_duplicate_id(tmp_path: Path) -> None:
    record = {"id": "a", "text": "x", "entities": []}
    gold = write_gold(tmp_path / "gold.jsonl", [record, record])

    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_gold(gold)


def test_load_gold_rejects_bad_label(tmp_path: Path) -> None:
    gold = write_gold(
        tmp_path / "gold.jsonl",
        [
            {
                "id": "a",
                "text": "Nodule.",
                "entities": [{"start": 0, "end": 6, "label": "DISEASE", "assertion": "present"}],
            }
        ],
    )

    with pytest.raises(ValueError, match=r"gold\.jsonl:1: invalid entity label 'DISEASE'"):
        load_gold(gold)


def test_load_gold_rejects_missing_key(tmp_path: Path) -> None:
    gold = write_gold(tmp_path / "gold.jsonl", [{"id": "a", "entities": []}])

    with pytest.raises(ValueError, match=r"gold\.jsonl:1: missing key 'text'"):
        load_gold(gold)


def test_load_gold_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gold file not found"):
        load_gold(tmp_path / "absent.jsonl")
