"""ConText-style assertion rules on hand-checked sentences."""

from __future__ import annotations

import pytest

from medsyn_xai.ner.assertion import assertion_rules_digest, assign_assertions, find_cues


def spans_of(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of each phrase, each searched after the previous one."""
    spans = []
    cursor = 0
    for phrase in phrases:
        start = text.index(phrase, cursor)
        spans.append((start, start + len(phrase)))
        cursor = start + len(phrase)
    return spans


CASES = [
    # Negation lists: commas, "or" and "and" keep the scope open.
    (
        "No pleural effusion, pneumothorax or cardiomegaly.",
        ["pleural effusion", "pneumothorax", "cardiomegaly"],
        ["absent"] * 3,
    ),
    (
        "No nodules, masses, and no consolidation.",
        ["nodules", "masses", "consolidation"],
        ["absent"] * 3,
    ),
    ("Without pericardial effusion.", ["pericardial effusion"], ["absent"]),
    ("Negative for pulmonary embolism.", ["pulmonary embolism"], ["absent"]),
    ("Pleural spaces are free of effusion.", ["Pleural spaces", "effusion"], ["present", "absent"]),
    ("Absence of lymphadenopathy.", ["lymphadenopathy"], ["absent"]),
    # Terminators end the scope.
    ("No effusion. Small nodule.", ["effusion", "nodule"], ["absent", "present"]),
    ("No effusion; small nodule.", ["effusion", "nodule"], ["absent", "present"]),
    ("No effusion but a small nodule.", ["effusion", "nodule"], ["absent", "present"]),
    ("No effusion, however a nodule is seen.", ["effusion", "nodule"], ["absent", "present"]),
    ("No effusion\nNodule in RUL", ["effusion", "Nodule"], ["absent", "present"]),
    ("Lungs: no nodule", ["Lungs", "nodule"], ["present", "absent"]),
    # A decimal point is not a period.
    ("No 1.2 cm nodule", ["1.2 cm", "nodule"], ["absent", "absent"]),
    # Cues before the entity only apply forward.
    ("The heart is not enlarged.", ["heart", "enlarged"], ["present", "absent"]),
    # Backward cues.
    ("Pneumothorax has resolved.", ["Pneumothorax"], ["absent"]),
    ("Pleural effusion is excluded.", ["Pleural effusion"], ["absent"]),
    ("The nodule is no longer seen.", ["nodule"], ["absent"]),
    ("Pulmonary embolism was ruled out.", ["Pulmonary embolism"], ["absent"]),
    ("Pulmonary nodules: none.", ["Pulmonary nodules"], ["absent"]),
    ("Consolidation has cleared.", ["Consolidation"], ["absent"]),
    # "resolved" alone looks back when it can, forward otherwise.
    ("The effusion resolved.", ["effusion"], ["absent"]),
    ("Resolved left pneumothorax.", ["left", "pneumothorax"], ["absent", "absent"]),
    # Uncertainty.
    ("Possible small nodule.", ["small", "nodule"], ["uncertain", "uncertain"]),
    ("Opacity, likely atelectasis.", ["Opacity", "atelectasis"], ["present", "uncertain"]),
    ("Opacity may represent infection.", ["Opacity", "infection"], ["present", "uncertain"]),
    ("Findings suspicious for malignancy.", ["malignancy"], ["uncertain"]),
    ("Pneumonia cannot be excluded.", ["Pneumonia"], ["uncertain"]),
    ("Cannot exclude pneumonia.", ["pneumonia"], ["uncertain"]),
    ("Pneumonia is likely.", ["Pneumonia"], ["uncertain"]),
    ("The opacity is likely atelectasis.", ["opacity", "atelectasis"], ["present", "uncertain"]),
    ("Pneumothorax, if present, is small.", ["Pneumothorax", "small"], ["uncertain", "uncertain"]),
    ("Emphysema, compatible with COPD.", ["Emphysema", "COPD"], ["present", "uncertain"]),
    ("Fibrosis, consistent with UIP.", ["Fibrosis", "UIP"], ["present", "present"]),
    # "versus" hedges the two alternatives next to it, both sides.
    ("Atelectasis versus pneumonia.", ["Atelectasis", "pneumonia"], ["uncertain", "uncertain"]),
    (
        "Atelectasis vs. pneumonia in the RLL.",
        ["Atelectasis", "pneumonia", "RLL"],
        ["uncertain"] * 3,
    ),
    (
        "Small effusion with atelectasis versus pneumonia.",
        ["Small", "effusion", "atelectasis", "pneumonia"],
        ["present", "present", "uncertain", "uncertain"],
    ),
    (
        "Patchy opacity may represent edema versus infection.",
        ["Patchy", "opacity", "edema", "infection"],
        ["present", "present", "uncertain", "uncertain"],
    ),
    # Pseudo-cues contain "no" but negate nothing.
    ("No change in the 5 mm nodule.", ["5 mm", "nodule"], ["present", "present"]),
    ("No significant interval change in the mass.", ["mass"], ["present"]),
    # The nearest cue decides.
    (
        "No effusion, possible small nodule.",
        ["effusion", "small", "nodule"],
        ["absent", "uncertain", "uncertain"],
    ),
    (
        "No large pneumothorax; a small pneumothorax cannot be excluded.",
        ["large", "pneumothorax", "small", "pneumothorax"],
        ["absent", "absent", "uncertain", "uncertain"],
    ),
    # "unlikely" looks back when an entity precedes it, else forward.
    ("Malignancy is unlikely.", ["Malignancy"], ["uncertain"]),
    ("Unlikely to represent malignancy. Small nodule.", ["malignancy", "nodule"], ["uncertain", "present"]),
    ("Evaluate for pneumonia.", ["pneumonia"], ["uncertain"]),
    # A comma before a number and "and a" start a new finding.
    (
        "No pleural effusion or pneumothorax, 2 cm mass in the right upper lobe.",
        ["pleural effusion", "pneumothorax", "mass", "right upper lobe"],
        ["absent", "absent", "present", "present"],
    ),
    ("No effusion and a 2 cm mass.", ["effusion", "mass"], ["absent", "present"]),
    ("No effusion and there is a nodule.", ["effusion", "nodule"], ["absent", "present"]),
    ("No effusion and no nodule.", ["effusion", "nodule"], ["absent", "absent"]),
    # Growth and enlargement pseudo-cues keep the finding present.
    ("No interval growth of the nodule in the left lower lobe.", ["nodule", "left lower lobe"], ["present"] * 2),
    ("No enlargement of the 9 mm nodule.", ["nodule"], ["present"]),
    # Case and surrounding words.
    ("NO PNEUMOTHORAX.", ["PNEUMOTHORAX"], ["absent"]),
    ("Nodule noted; nonspecific.", ["Nodule"], ["present"]),
]


@pytest.mark.parametrize(
    ("text", "phrases", "expected"), CASES, ids=[case[0][:40] for case in CASES]
)
def test_assertion_cases(text: str, phrases: list[str], expected: list[str]) -> None:
    assert assign_assertions(text, spans_of(text, phrases)) == expected


def test_no_spans_gives_empty_list() -> None:
    assert assign_assertions("No pneumothorax.", []) == []


def test_cue_inside_word_ignored() -> None:
    assert find_cues("Noncalcified nodule; notable nonetheless, knowingly.") == []


def test_find_cues_scope_limits() -> None:
    text = "Nodule. No effusion or mass; stable."

    (cue,) = find_cues(text)

    assert text[cue.start : cue.end] == "No"
    assert cue.assertion == "absent"
    assert cue.direction == "forward"
    assert text[cue.after[0] : cue.after[1]] == " effusion or mass"
    assert text[cue.clause[0] : cue.clause[1]] == " No effusion or mass"


def test_versus_period_is_not_terminator() -> None:
    text = "Atelectasis vs. pneumonia"

    (cue,) = find_cues(text)

    assert text[cue.start : cue.end] == "vs."
    assert cue.after == (cue.end, len(text))


def test_rules_digest_stable() -> None:
    assert assertion_rules_digest() == assertion_rules_digest()
    assert len(assertion_rules_digest()) == 64
