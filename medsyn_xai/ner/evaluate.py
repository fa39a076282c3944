"""Score a backend against a hand-annotated gold set (JSON lines).

Each line of the gold file is one prompt::

    {"id": "p001", "text": "Small left pleural effusion.",
     "entities": [{"start": 0, "end": 5, "label": "MODIFIER", "assertion": "present",
                   "text": "Small"}, ...]}

``text`` inside an entity is optional; when present it must equal the prompt's
characters at ``[start, end)``. An entity counts as found when the backend
returns one with the same start, end and label (exact match). Assertion accuracy
is measured over those exact matches only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsyn_xai.ner.backends import NERBackend
from medsyn_xai.ner.entity import ASSERTIONS, LABELS, Entity

__all__ = ["GoldDocument", "evaluate_ner", "format_report", "load_gold"]


@dataclass(frozen=True)
class GoldDocument:
    """One annotated prompt of the gold set.

    Attributes:
        id: identifier, unique within the file.
        text: the prompt.
        entities: the annotated entities, sorted by start offset.
    """

    id: str
    text: str
    entities: tuple[Entity, ...]


def _parse_entity(raw: dict[str, Any], text: str) -> Entity:
    """Build a gold entity and check its offsets against the prompt."""
    start, end = int(raw["start"]), int(raw["end"])
    if not 0 <= start < end <= len(text):
        message = (
            f"invalid span [{start}, {end}) for a prompt of {len(text)} characters; fix the offsets"
        )
        raise ValueError(message)
    if "text" in raw and raw["text"] != text[start:end]:
        message = (
            f"entity text {raw['text']!r} does not match "
            f"prompt[{start}:{end}] = {text[start:end]!r}; fix the offsets"
        )
        raise ValueError(message)
    return Entity(
        text=text[start:end],
        label=raw["label"],
        start=start,
        end=end,
        assertion=raw["assertion"],
        backend="gold",
        backend_version="",
    )


def load_gold(path: str | Path) -> list[GoldDocument]:
    """Read and validate a gold file.

    Args:
        path: JSON-lines file in the format of this module's docstring; blank
            lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON, misses a key, repeats an id, or has
            an entity whose span, label, assertion or text is invalid. The
            message names the file and line.
    """
    gold_path = Path(path)
    if not gold_path.is_file():
        message = f"gold file not found: {gold_path}"
        raise FileNotFoundError(message)

    documents: list[GoldDocument] = []
    seen_ids: set[str] = set()
    lines = gold_path.read_text(encoding="utf-8").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{gold_path}:{line_number}"
        try:
            record = json.loads(line)
            document_id, text = str(record["id"]), str(record["text"])
            raw_entities = record["entities"]
            entities = [_parse_entity(raw, text) for raw in raw_entities]
        except json.JSONDecodeError as error:
            message = f"{where}: invalid JSON ({error.msg} at column {error.colno})"
            raise ValueError(message) from error
        except ValueError as error:
            message = f"{where}: {error}"
            raise ValueError(message) from error
        except KeyError as error:
            message = (
                f"{where}: missing key {error.args[0]!r}; "
                "each line needs id, text and entities, each entity start, end, label, assertion"
            )
            raise ValueError(message) from error

        if document_id in seen_ids:
            message = f"{where}: duplicate id {document_id!r}; give every prompt its own id"
            raise ValueError(message)
        seen_ids.add(document_id)
        entities.sort(key=lambda entity: (entity.start, entity.end))
        documents.append(GoldDocument(id=document_id, text=text, entities=tuple(entities)))
    return documents


def _scores(true_positives: int, false_positives: int, false_negatives: int) -> dict[str, Any]:
    """Precision, recall and F1; a ratio with a zero denominator is 0.0."""
    predicted = true_positives + false_positives
    actual = true_positives + false_negatives
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": true_positives,
        "false_positives": false_positives,
        "false_negatives": false_negatives,
        "support": actual,
    }


def evaluate_ner(backend: NERBackend, gold_path: str | Path) -> dict[str, Any]:
    """Run ``backend`` on every gold prompt and score it.

    Args:
        backend: any object with ``name``, ``version`` and ``extract(text)``.
        gold_path: the gold JSON-lines file.

    Returns:
        A JSON-ready dict with keys:

        * ``backend``, ``backend_version``, ``documents``.
        * ``labels``: label -> precision, recall, f1, true_positives,
          false_positives, false_negatives, support (gold count).
        * ``micro``: the same scores over all labels together.
        * ``assertion``: accuracy, correct, matched (entities matched exactly),
          confusion (gold assertion -> predicted assertion -> count).
        * ``errors``: one dict per missed, spurious or wrongly asserted entity,
          with id, kind ("missed", "spurious" or "assertion"), text, label,
          start, end, gold_assertion and predicted_assertion.
    """
    documents = load_gold(gold_path)
    counts = {label: Counter[str]() for label in LABELS}
    confusion = {gold: {predicted: 0 for predicted in ASSERTIONS} for gold in ASSERTIONS}
    errors: list[dict[str, Any]] = []

    for document in documents:
        gold = {(entity.start, entity.end, entity.label): entity for entity in document.entities}
        predicted = {
            (entity.start, entity.end, entity.label): entity
            for entity in backend.extract(document.text)
        }

        for key, gold_entity in gold.items():
            predicted_entity = predicted.get(key)
            if predicted_entity is None:
                counts[gold_entity.label]["false_negatives"] += 1
                errors.append(
                    _error(document.id, "missed", gold_entity, gold_entity.assertion, None)
                )
                continue
            counts[gold_entity.label]["true_positives"] += 1
            confusion[gold_entity.assertion][predicted_entity.assertion] += 1
            if predicted_entity.assertion != gold_entity.assertion:
                errors.append(
                    _error(
                        document.id,
                        "assertion",
                        gold_entity,
                        gold_entity.assertion,
                        predicted_entity.assertion,
                    )
                )

        for key, predicted_entity in predicted.items():
            if key not in gold:
                counts[predicted_entity.label]["false_positives"] += 1
                errors.append(
                    _error(
                        document.id, "spurious", predicted_entity, None, predicted_entity.assertion
                    )
                )

    labels = {
        label: _scores(
            counts[label]["true_positives"],
            counts[label]["false_positives"],
            counts[label]["false_negatives"],
        )
        for label in LABELS
    }
    micro = _scores(
        sum(counts[label]["true_positives"] for label in LABELS),
        sum(counts[label]["false_positives"] for label in LABELS),
        sum(counts[label]["false_negatives"] for label in LABELS),
    )
    matched = sum(sum(row.values()) for row in confusion.values())
    correct = sum(confusion[assertion][assertion] for assertion in ASSERTIONS)

    return {
        "backend": backend.name,
        "backend_version": backend.version,
        "documents": len(documents),
        "labels": labels,
        "micro": micro,
        "assertion": {
            "accuracy": correct / matched if matched else 0.0,
            "correct": correct,
            "matched": matched,
            "confusion": confusion,
        },
        "errors": errors,
    }


def _error(
    document_id: str,
    kind: str,
    entity: Entity,
    gold_assertion: str | None,
    predicted_assertion: str | None,
) -> dict[str, Any]:
    return {
        "id": document_id,
        "kind": kind,
        "text": entity.text,
        "label": entity.label,
        "start": entity.start,
        "end": entity.end,
        "gold_assertion": gold_assertion,
        "predicted_assertion": predicted_assertion,
    }


def format_report(result: dict[str, Any]) -> str:
    """Render :func:`evaluate_ner` output as a plain-text table.

    Returns:
        A line naming the backend, then one row per label and one for the micro
        average with precision, recall and F1 to three decimals, support, TP, FP
        and FN. The last line gives the assertion accuracy. There is no trailing
        newline.
    """
    header = (
        f"{'label':<10} {'precision':>9} {'recall':>7} {'f1':>6} "
        f"{'support':>7} {'tp':>5} {'fp':>5} {'fn':>5}"
    )
    lines = [
        f"backend {result['backend']} {result['backend_version']}, {result['documents']} prompts",
        header,
        "-" * len(header),
    ]
    rows = [*result["labels"].items(), ("micro", result["micro"])]
    for name, scores in rows:
        lines.append(
            f"{name:<10} {scores['precision']:>9.3f} {scores['recall']:>7.3f} {scores['f1']:>6.3f} "
            f"{scores['support']:>7d} {scores['true_positives']:>5d} "
            f"{scores['false_positives']:>5d} {scores['false_negatives']:>5d}"
        )
    assertion = result["assertion"]
    lines.append(
        f"assertion accuracy {assertion['accuracy']:.3f} "
        f"({assertion['correct']} of {assertion['matched']} exactly matched entities)"
    )
    return "\n".join(lines)
