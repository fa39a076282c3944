"""ConText-style assertion: negation and uncertainty cues with a scope each.

Every backend finds spans first and then calls :func:`assign_assertions`. The
rules, in order:

1. Cues are found left to right and never overlap. Where two start at the same
   character the longer wins, and a cue hides every cue inside it. So "cannot be
   excluded" is one uncertainty cue and not the negation "excluded", and "no
   change" is a pseudo-cue that stops "no" from negating ("No change in the 5 mm
   nodule" keeps the nodule present).

2. A terminator ends every scope: one of ``. ; : ! ?`` (a period between digits
   is a decimal point, not a terminator), a line break, or one of the words "but",
   "however", "although", "though", "whereas", "which", "except", "apart from",
   "aside from", "other than". Commas, "and" and "or" do not end a scope, so "No
   pleural effusion, pneumothorax or cardiomegaly" negates all three findings.
   Two exceptions end the scope, because a negation list does not go on that
   way: a comma before a number ("No effusion, 2 cm mass in the right upper
   lobe") and "and a", "and an" or "and there" ("No effusion and a 2 cm mass").
   NOTE: for the same reason a negation reaches into a second clause joined by a
   comma, so "Without effusion, the lungs show emphysema" negates the emphysema.

3. A forward cue ("no", "possible") covers the text from its end to the next
   terminator or cue. A backward cue ("has resolved", "cannot be excluded")
   covers the text from the previous terminator or cue to its start. A clause
   cue ("if present") covers both sides. "versus" and "vs" cover both sides too,
   but only up to the nearest comma, "and" or "with", because they hedge the two
   alternatives next to them and not the whole clause ("Small effusion with
   atelectasis versus pneumonia" keeps the effusion present). A bare "resolved"
   or "cleared" is backward when an entity precedes it in its clause ("The
   effusion resolved") and forward otherwise ("Resolved pneumothorax").

4. An entity lies in a scope when its whole span does. Of the cues whose scope
   contains it, the nearest one decides: "absent" for a negation cue, "uncertain"
   for an uncertainty cue. An entity in no scope is "present".

Every entity is asserted the same way, whatever its label, so in "No nodule in
the right upper lobe" the BODY_PART "right upper lobe" is "absent" too.
"consistent with" is not a cue, because radiologists use it to affirm.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from medsyn_xai.ner.entity import Assertion

__all__ = ["CueMatch", "assertion_rules_digest", "assign_assertions", "find_cues"]

Direction = Literal["forward", "backward", "both", "clause", "either"]

_TRAILING_HEDGE = r"(?:is|are|was|were)\s+(?:likely|possible|probable|suspected|questionable)"
_CLAUSE_END = r"(?=\s*(?:[.;:,!?]|$))"

# Each entry: (regular expression, assertion or None for a pseudo-cue, direction).
# Phrases are written with single spaces; any run of whitespace matches a space.
_CUES: tuple[tuple[str, Assertion | None, Direction], ...] = (
    # Negation, forward.
    ("no", "absent", "forward"),
    ("not", "absent", "forward"),
    ("without", "absent", "forward"),
    ("w/o", "absent", "forward"),
    ("negative for", "absent", "forward"),
    ("free of", "absent", "forward"),
    ("clear of", "absent", "forward"),
    ("absence of", "absent", "forward"),
    ("no evidence of", "absent", "forward"),
    ("no signs of", "absent", "forward"),
    ("no sign of", "absent", "forward"),
    ("resolution of", "absent", "forward"),
    ("interval resolution of", "absent", "forward"),
    # Negation, backward.
    ("resolved", "absent", "either"),
    ("has resolved", "absent", "backward"),
    ("have resolved", "absent", "backward"),
    ("is resolved", "absent", "backward"),
    ("are resolved", "absent", "backward"),
    ("excluded", "absent", "backward"),
    ("is excluded", "absent", "backward"),
    ("are excluded", "absent", "backward"),
    ("was excluded", "absent", "backward"),
    ("has been excluded", "absent", "backward"),
    ("ruled out", "absent", "backward"),
    ("has been ruled out", "absent", "backward"),
    ("is absent", "absent", "backward"),
    ("are absent", "absent", "backward"),
    ("absent", "absent", "backward"),
    ("not seen", "absent", "backward"),
    ("not identified", "absent", "backward"),
    ("not visualized", "absent", "backward"),
    ("not present", "absent", "backward"),
    ("not evident", "absent", "backward"),
    ("not demonstrated", "absent", "backward"),
    ("no longer seen", "absent", "backward"),
    ("no longer visible", "absent", "backward"),
    ("no longer visualized", "absent", "backward"),
    ("no longer present", "absent", "backward"),
    ("no longer identified", "absent", "backward"),
    ("cleared", "absent", "either"),
    ("has cleared", "absent", "backward"),
    ("have cleared", "absent", "backward"),
    # A colon before "none" belongs to the cue, so "Nodules: none" is one clause.
    (r":\s*(?:none|negative|absent)", "absent", "backward"),
    # Uncertainty, forward.
    ("likely", "uncertain", "forward"),
    ("probable", "uncertain", "forward"),
    ("probably", "uncertain", "forward"),
    ("possible", "uncertain", "forward"),
    ("possibly", "uncertain", "forward"),
    ("presumed", "uncertain", "forward"),
    ("suspected", "uncertain", "forward"),
    ("suspicious for", "uncertain", "forward"),
    ("concerning for", "uncertain", "forward"),
    ("concern for", "uncertain", "forward"),
    ("suggestive of", "uncertain", "forward"),
    ("suggesting", "uncertain", "forward"),
    ("suggests", "uncertain", "forward"),
    ("suggest", "uncertain", "forward"),
    ("can be seen with", "uncertain", "forward"),
    ("may be seen with", "uncertain", "forward"),
    ("evaluation for", "uncertain", "forward"),
    ("to evaluate for", "uncertain", "forward"),
    ("evaluate for", "uncertain", "forward"),
    ("compatible with", "uncertain", "forward"),
    ("questionable", "uncertain", "forward"),
    ("question of", "uncertain", "forward"),
    ("equivocal", "uncertain", "forward"),
    ("cannot exclude", "uncertain", "forward"),
    ("can not exclude", "uncertain", "forward"),
    ("cannot rule out", "uncertain", "forward"),
    ("rule out", "uncertain", "forward"),
    ("may represent", "uncertain", "forward"),
    ("may reflect", "uncertain", "forward"),
    ("may be", "uncertain", "forward"),
    ("might represent", "uncertain", "forward"),
    ("could represent", "uncertain", "forward"),
    ("could be", "uncertain", "forward"),
    ("differential includes", "uncertain", "forward"),
    ("differential diagnosis includes", "uncertain", "forward"),
    # Uncertainty, backward when an entity precedes it in its clause ("Malignancy is
    # unlikely"), else forward ("Unlikely to represent malignancy").
    ("unlikely", "uncertain", "either"),
    # Uncertainty, backward.
    ("cannot be excluded", "uncertain", "backward"),
    ("can not be excluded", "uncertain", "backward"),
    ("not excluded", "uncertain", "backward"),
    ("cannot be ruled out", "uncertain", "backward"),
    ("not ruled out", "uncertain", "backward"),
    (_TRAILING_HEDGE + _CLAUSE_END, "uncertain", "backward"),
    # Uncertainty, both sides.
    ("versus", "uncertain", "both"),
    (r"vs\.?", "uncertain", "both"),
    ("if present", "uncertain", "clause"),
    ("if any", "uncertain", "clause"),
    # Pseudo-cues: they contain a cue word but assert nothing.
    ("no change", None, "forward"),
    ("no interval change", None, "forward"),
    ("no interval growth", None, "forward"),
    ("no growth", None, "forward"),
    ("no interval increase", None, "forward"),
    ("no interval enlargement", None, "forward"),
    ("no enlargement", None, "forward"),
    ("no significant change", None, "forward"),
    ("no significant interval change", None, "forward"),
    ("no increase", None, "forward"),
    ("no decrease", None, "forward"),
    ("not changed", None, "forward"),
    ("not significantly changed", None, "forward"),
    ("without change", None, "forward"),
    ("without interval change", None, "forward"),
    ("without significant change", None, "forward"),
)

_TERMINATOR_WORDS: tuple[str, ...] = (
    "but",
    "however",
    "although",
    "though",
    "whereas",
    "which",
    "except",
    "apart from",
    "aside from",
    "other than",
)

_ALTERNATIVE_BOUNDARY = re.compile(r",|(?<!\w)(?:and|with)(?!\w)", re.IGNORECASE)
"""Commas and the words "and" and "with": scope limits of a two-sided cue such as "versus"."""

_TERMINATOR_PATTERN = re.compile(
    r"[;:!?\n]|\.(?!\d)|,(?=\s*\d)|(?<!\w)and\s+(?:a|an|there)(?!\w)|(?<!\w)(?:"
    + "|".join(word.replace(" ", r"\s+") for word in _TERMINATOR_WORDS)
    + r")(?!\w)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class CueMatch:
    """One cue found in a text, with its scope.

    Attributes:
        start: character offset of the cue's first character.
        end: character offset one past the cue's last character.
        assertion: "absent" or "uncertain"; None for a pseudo-cue.
        direction: "forward", "backward", "both" (two alternatives), "clause" or "either".
        clause: (start, end) characters between the terminators around the cue.
        before: (start, end) characters from the scope limit before the cue to the cue.
        after: (start, end) characters from the cue to the scope limit after it.
    """

    start: int
    end: int
    assertion: Assertion | None
    direction: Direction
    clause: tuple[int, int]
    before: tuple[int, int]
    after: tuple[int, int]


def _phrase_source(phrase: str) -> str:
    """Return a regex source for a cue; plain phrases are escaped, spaces match any run."""
    if any(character in phrase for character in "\\()[]?"):
        return phrase
    return r"\s+".join(re.escape(word) for word in phrase.split(" "))


@lru_cache(maxsize=1)
def _cue_pattern() -> tuple[re.Pattern[str], tuple[tuple[Assertion | None, Direction], ...]]:
    """Compile every cue into one alternation, longest source first."""
    ordered = sorted(_CUES, key=lambda cue: len(cue[0]), reverse=True)
    groups = [
        f"(?P<c{index}>{_phrase_source(source)})" for index, (source, _, _) in enumerate(ordered)
    ]
    # A cue that starts or ends with a word character must start or end a word.
    word_start = r"(?:(?<!\w)|(?=\W))"
    word_end = r"(?:(?!\w)|(?<=\W))"
    pattern = re.compile(word_start + "(?:" + "|".join(groups) + ")" + word_end, re.IGNORECASE)
    meanings = tuple((assertion, direction) for _, assertion, direction in ordered)
    return pattern, meanings


def assertion_rules_digest() -> str:
    """SHA-256 hex digest of the cue and terminator tables; any edit to them changes it."""
    payload = {
        "cues": [list(cue) for cue in _CUES],
        "terminators": _TERMINATOR_PATTERN.pattern,
        "alternative_boundary": _ALTERNATIVE_BOUNDARY.pattern,
    }
    encoded = json.dumps(payload, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _find_terminators(text: str, cue_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the terminator spans of ``text`` that lie outside every cue."""
    # A period inside "vs." belongs to the cue and ends no scope.
    cue_starts = [start for start, _ in cue_spans]
    terminators = []
    for match in _TERMINATOR_PATTERN.finditer(text):
        index = bisect.bisect_right(cue_starts, match.start()) - 1
        if index >= 0 and match.start() < cue_spans[index][1]:
            continue
        terminators.append(match.span())
    return terminators


def _narrow_to_alternatives(
    text: str, before_start: int, cue_span: tuple[int, int], after_end: int
) -> tuple[int, int]:
    """Move a two-sided cue's scope limits in to the nearest comma, "and" or "with"."""
    boundaries_before = list(_ALTERNATIVE_BOUNDARY.finditer(text, before_start, cue_span[0]))
    if boundaries_before:
        before_start = boundaries_before[-1].end()
    boundary_after = _ALTERNATIVE_BOUNDARY.search(text, cue_span[1], after_end)
    if boundary_after is not None:
        after_end = boundary_after.start()
    return before_start, after_end


def find_cues(text: str) -> list[CueMatch]:
    """Find the negation, uncertainty and pseudo-cues of ``text``, in order of position.

    Args:
        text: the prompt.

    Returns:
        One :class:`CueMatch` per cue. Its ``before`` and ``after`` ranges end at
        the nearest terminator or neighbouring cue, whatever the cue's direction.
        For "versus" they end at the nearest comma, "and" or "with" as well.
    """
    pattern, meanings = _cue_pattern()
    cues = list(pattern.finditer(text))
    terminators = _find_terminators(text, [match.span() for match in cues])
    terminator_starts = [start for start, _ in terminators]
    terminator_ends = [end for _, end in terminators]

    found: list[CueMatch] = []
    for position, match in enumerate(cues):
        group_index = int(match.lastgroup[1:]) if match.lastgroup else 0
        assertion, direction = meanings[group_index]

        previous = bisect.bisect_right(terminator_ends, match.start()) - 1
        following = bisect.bisect_left(terminator_starts, match.end())
        clause_start = terminator_ends[previous] if previous >= 0 else 0
        clause_end = terminator_starts[following] if following < len(terminators) else len(text)

        before_start, after_end = clause_start, clause_end
        if position > 0:
            before_start = max(before_start, cues[position - 1].end())
        if position + 1 < len(cues):
            after_end = min(after_end, cues[position + 1].start())
        if direction == "both":
            before_start, after_end = _narrow_to_alternatives(
                text, before_start, match.span(), after_end
            )

        found.append(
            CueMatch(
                start=match.start(),
                end=match.end(),
                assertion=assertion,
                direction=direction,
                clause=(clause_start, clause_end),
                before=(before_start, match.start()),
                after=(match.end(), after_end),
            )
        )
    return found


def _inside(span: tuple[int, int], scope: tuple[int, int]) -> bool:
    return scope[0] <= span[0] and span[1] <= scope[1]


def _scopes(cue: CueMatch, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the character ranges a cue asserts over, given the entity spans of its clause."""
    if cue.direction == "forward":
        return [cue.after]
    if cue.direction == "backward":
        return [cue.before]
    if cue.direction in ("both", "clause"):
        return [cue.before, cue.after]
    if any(_inside(span, cue.before) for span in spans):
        return [cue.before]
    return [cue.after]


def assign_assertions(text: str, spans: Sequence[tuple[int, int]]) -> list[Assertion]:
    """Assert each entity span of ``text`` as present, absent or uncertain.

    Args:
        text: the prompt.
        spans: (start, end) character offsets of the entities, end exclusive.

    Returns:
        One assertion per span, in the order given.
    """
    # Scopes never cross a terminator, so a span only meets the cues of its clause,
    # and a clause is named by the offset where it starts.
    spans_by_clause: dict[int, list[tuple[int, int]]] = {}
    cues_by_clause: dict[int, list[CueMatch]] = {}
    for cue in find_cues(text):
        if cue.assertion is not None:
            cues_by_clause.setdefault(cue.clause[0], []).append(cue)

    clause_starts = sorted(cues_by_clause)
    span_clauses = []
    for span in spans:
        index = bisect.bisect_right(clause_starts, span[0]) - 1
        clause = clause_starts[index] if index >= 0 else -1
        span_clauses.append(clause)
        spans_by_clause.setdefault(clause, []).append(span)

    assertions: list[Assertion] = []
    for span, clause in zip(spans, span_clauses, strict=True):
        best_distance = len(text) + 1
        best: Assertion = "present"
        for cue in cues_by_clause.get(clause, []):
            if not any(_inside(span, scope) for scope in _scopes(cue, spans_by_clause[clause])):
                continue
            distance = span[0] - cue.end if span[0] >= cue.end else cue.start - span[1]
            if distance < best_distance and cue.assertion is not None:
                best_distance = distance
                best = cue.assertion
        assertions.append(best)
    return assertions
