"""Radiology-style report text for a phantom spec, with the character span of every finding mention."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from medsyn_xai.phantom import phrases
from medsyn_xai.phantom.spec import SHORT_AXIS_RATIO, Finding, PhantomSpec

__all__ = ["HEDGE_CUES", "NEGATION_CUES", "Mention", "Report", "write_report"]

HEDGE_CUES = phrases.HEDGE_CUES
NEGATION_CUES = phrases.NEGATION_CUES

_SECTION_OF_KIND = {
    "nodule": "lungs",
    "mass": "lungs",
    "consolidation": "lungs",
    "ground_glass": "lungs",
    "atelectasis": "lungs",
    "emphysema": "lungs",
    "pleural_effusion": "pleura",
    "pneumothorax": "pleura",
    "cardiomegaly": "heart",
    "pericardial_effusion": "heart",
}
_SECTIONS = ("lungs", "pleura", "heart", "bones")
_LAYOUTS = ("plain", "findings_impression", "sections")
_REPORT_STREAM = 7
_MAX_IMPRESSION_ITEMS = 3
# Letters whose English names start with a vowel sound ("an RUL nodule").
_VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")


class Mention(NamedTuple):
    """Span of one finding's term in a report.

    Attributes:
        finding: index into ``spec.findings``.
        start: offset of the finding term's first character in ``Report.text``.
        end: offset one past its last character, so ``text[start:end]`` is the
            term ("nodule", "pleural effusions", "GGO", "enlarged").
        assertion: the finding's assertion, "present", "absent" or "uncertain".
    """

    finding: int
    start: int
    end: int
    assertion: str


@dataclass(frozen=True)
class Report:
    """A report and the mentions of its spec's findings, sorted by ``start``.

    Every finding has at least one mention. A finding named in both the findings
    and the impression has two.
    """

    text: str
    mentions: tuple[Mention, ...]

    def mentions_of(self, finding: int) -> tuple[Mention, ...]:
        """Return the mentions of ``spec.findings[finding]``."""
        return tuple(mention for mention in self.mentions if mention.finding == finding)


@dataclass(frozen=True)
class _Piece:
    """Text with (start, end, finding index) spans of the finding terms inside it."""

    text: str
    spans: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class _Style:
    """Wording choices held for a whole report."""

    abbreviate_lobes: bool
    centimetres: bool


def _join(pieces: list[_Piece | str], separator: str = "") -> _Piece:
    texts = []
    spans = []
    offset = 0
    for number, piece in enumerate(pieces):
        if number > 0:
            texts.append(separator)
            offset += len(separator)
        if isinstance(piece, str):
            piece = _Piece(piece)
        texts.append(piece.text)
        spans.extend((start + offset, end + offset, index) for start, end, index in piece.spans)
        offset += len(piece.text)
    return _Piece("".join(texts), tuple(spans))


def _fill(template: str, values: dict[str, str | _Piece]) -> _Piece:
    """Substitute ``values`` into a :class:`string.Formatter` template, carrying term spans along."""
    pieces: list[_Piece | str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if field is not None:
            pieces.append(values[field])
    return _join(pieces)


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _capitalize(piece: _Piece) -> _Piece:
    return _Piece(piece.text[:1].upper() + piece.text[1:], piece.spans)


def _article(text: str) -> str:
    """Return "a " or "an " for the phrase ``text`` by how its first word sounds."""
    word = text.split(" ", 1)[0]
    if word[:1].isdigit():
        whole = word.split(".", 1)[0].split("-", 1)[0]
        vowel = whole.startswith("8") or whole in ("11", "18")
    elif len(word) > 1 and word.isupper():
        vowel = word[0] in _VOWEL_SOUND_LETTERS
    else:
        vowel = word[:1].lower() in "aeiou"
    return "an " if vowel else "a "


def _choose(rng: np.random.Generator, options: tuple | list):
    return options[int(rng.integers(len(options)))]


def _format_mm(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _slot_values(finding: Finding, rng: np.random.Generator, style: _Style) -> dict[str, str | _Piece]:
    """Return the template values that ``finding``'s fields allow, worded for this report."""
    values: dict[str, str | _Piece] = {"size_": "" if finding.size is None else f"{finding.size} "}
    if finding.lobe is not None:
        noun, adjective, abbreviation = phrases.LOBE_WORDS[finding.lobe]
        use_abbreviation = style.abbreviate_lobes and abbreviation is not None
        values["loc"] = abbreviation if use_abbreviation else noun
        values["loc_adj"] = abbreviation if use_abbreviation else adjective
    if finding.side is not None:
        values["side"] = _choose(rng, phrases.SIDE_WORDS[finding.side])
        if finding.side != "bilateral":
            values["side_noun"] = finding.side
    if finding.size is not None:
        values["size"] = finding.size
    if finding.size_mm is not None:
        long_mm = float(finding.size_mm)
        short_mm = long_mm * SHORT_AXIS_RATIO.get(finding.kind, 1.0)
        if style.centimetres:
            values["meas"] = f"{long_mm / 10:.1f} cm"
            values["dims"] = f"{long_mm / 10:.1f} x {short_mm / 10:.1f} cm"
        else:
            values["meas"] = f"{_format_mm(long_mm)} mm"
            values["dims"] = f"{round(long_mm)} x {round(short_mm)} mm"
    if finding.extent is not None:
        values["extent"] = _choose(rng, phrases.EMPHYSEMA_WORDS["extent"][finding.extent])
    if finding.zone is not None:
        values["zone_adj"] = phrases.EMPHYSEMA_WORDS["zone_adj"][finding.zone]
        values["zone_phrase"] = _choose(rng, phrases.EMPHYSEMA_WORDS["zone_phrase"][finding.zone])
    return values


def _noun_phrase(finding: Finding, index: int, rng: np.random.Generator, style: _Style) -> tuple[_Piece, str]:
    """Return the noun phrase of a finding, without article, and its grammatical number."""
    values = _slot_values(finding, rng, style)
    if finding.drawn:
        terms = phrases.DRAWN_TERMS[finding.kind]
        if finding.kind == "pleural_effusion" and finding.side == "bilateral":
            terms = phrases.BILATERAL_EFFUSION_TERMS
        templates = phrases.NOUN_PHRASES[finding.kind]
    else:
        terms = phrases.ABSENT_TERMS[finding.kind]
        if finding.lobe is not None:
            templates = phrases.ABSENT_NOUN_PHRASES["lobe"]
        elif finding.side is not None:
            templates = phrases.ABSENT_NOUN_PHRASES["side"]
        else:
            templates = phrases.ABSENT_NOUN_PHRASES["none"]
    term, number = _choose(rng, terms)
    values["term"] = _Piece(term, ((0, len(term), index),))
    usable = [template for template in templates if _fields(template) <= values.keys()]
    return _fill(_choose(rng, usable), values), number


def _frame(frame: str, noun_phrase: _Piece, number: str) -> _Piece:
    """Put a noun phrase into a sentence frame, adding article, capital and verb number."""
    article = _article(noun_phrase.text) if number == "count" else ""
    # {NP} opens the sentence unless a capitalised article {A} comes first.
    after_article = bool(article) and "{A}" in frame
    return _fill(frame, {
        "a": article,
        "A": article.capitalize(),
        "np": noun_phrase,
        "NP": noun_phrase if after_article else _capitalize(noun_phrase),
        "is": "are" if number == "plural" else "is",
    })


def _finding_sentence(finding: Finding, index: int, rng: np.random.Generator, style: _Style) -> _Piece:
    """Write one sentence stating, hedging or negating a finding, by its assertion."""
    special = {
        "present": phrases.SPECIAL_PRESENT_SENTENCES,
        "absent": phrases.SPECIAL_ABSENT_SENTENCES,
    }.get(finding.assertion, {})
    has_location = finding.lobe is not None or finding.side is not None
    if finding.kind in special and not has_location and rng.random() < 0.35:
        term = phrases.SPECIAL_TERM[finding.kind]
        return _fill(_choose(rng, special[finding.kind]), {"term": _Piece(term, ((0, len(term), index),))})

    frames = {
        "present": phrases.PRESENT_FRAMES,
        "uncertain": phrases.UNCERTAIN_FRAMES,
        "absent": phrases.ABSENT_FRAMES,
    }[finding.assertion]
    noun_phrase, number = _noun_phrase(finding, index, rng, style)
    return _frame(_choose(rng, frames), noun_phrase, number)


def _negation_list(items: list[tuple[int, Finding]], rng: np.random.Generator, style: _Style) -> _Piece:
    """Negate several unlocated findings in one sentence ("No pleural effusion, pneumothorax or cardiomegaly.")."""
    terms: list[_Piece] = []
    for index, finding in items:
        term, _ = _noun_phrase(finding, index, rng, style)
        duplicate = next((number for number, seen in enumerate(terms) if seen.text == term.text), None)
        if duplicate is None:
            terms.append(term)
        else:
            # Two negated findings with the same wording share one phrase.
            seen = terms[duplicate]
            start, end, _ = seen.spans[0]
            terms[duplicate] = _Piece(seen.text, seen.spans + ((start, end, index),))

    if len(terms) == 1:
        listed = terms[0]
    else:
        last_separator = ", or " if len(terms) > 2 and rng.random() < 0.3 else " or "
        listed = _join([_join(terms[:-1], ", "), terms[-1]], last_separator)
    return _fill(_choose(rng, phrases.ABSENT_LIST_FRAMES), {"list": listed})


def _impression(findings: tuple[Finding, ...], rng: np.random.Generator, style: _Style) -> _Piece:
    """Summarise up to three drawn findings, hedging uncertain ones, or state a normal study."""
    drawn = [(index, finding) for index, finding in enumerate(findings) if finding.drawn]
    if not drawn:
        return _Piece(_choose(rng, phrases.NORMAL_IMPRESSIONS))
    items = []
    for index, finding in drawn[:_MAX_IMPRESSION_ITEMS]:
        noun_phrase, _ = _noun_phrase(finding, index, rng, style)
        if finding.assertion == "uncertain":
            items.append(_fill("{hedge} {np}.", {"hedge": _choose(rng, phrases.IMPRESSION_HEDGES), "np": noun_phrase}))
        else:
            items.append(_fill("{NP}.", {"NP": _capitalize(noun_phrase)}))
    if len(items) > 1 and rng.random() < 0.5:
        return _join([_fill(f"{number}. {{item}}", {"item": item}) for number, item in enumerate(items, 1)], "\n")
    return _join(items, " ")


def _as_generator(rng_or_seed: np.random.Generator | int | None, spec: PhantomSpec) -> np.random.Generator:
    if rng_or_seed is None:
        return np.random.default_rng([spec.seed, _REPORT_STREAM])
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool) and rng_or_seed >= 0:
        return np.random.default_rng(int(rng_or_seed))
    message = f"rng_or_seed must be a numpy Generator, a non-negative int or None, got {rng_or_seed!r}"
    raise ValueError(message)


def write_report(spec: PhantomSpec, rng_or_seed: np.random.Generator | int | None = None) -> Report:
    """Write a chest CT report that states every drawn finding and negates every absent one.

    Present findings are stated plainly, uncertain ones with a hedge ("possible",
    "cannot exclude", "suspicious for"), absent ones with a negation, either
    alone ("No nodule in the RUL.") or in a list ("No pleural effusion or
    pneumothorax."). Sizes are given in mm or cm ("9 mm", "1.2 x 1.0 cm") and
    lobes spelled out or abbreviated, one choice per report. Statements of normal
    anatomy fill sections without findings and never name a finding kind.
    The layout is plain text, FINDINGS/IMPRESSION, or one heading per organ.

    Args:
        spec: the study to describe.
        rng_or_seed: a Generator (advanced by this call), a non-negative int
            seed, or None (default) to seed from ``spec.seed``. The same seed and
            spec always give the same report.

    Returns:
        The :class:`Report` with text and mentions.
    """
    rng = _as_generator(rng_or_seed, spec)
    style = _Style(abbreviate_lobes=rng.random() < 0.35, centimetres=rng.random() < 0.4)
    layout = _choose(rng, _LAYOUTS)

    # 1. One sentence per drawn or located negated finding. The rest wait for a negation list.
    sentences: dict[str, list[_Piece]] = {section: [] for section in _SECTIONS}
    unlisted: dict[str, list[tuple[int, Finding]]] = {section: [] for section in _SECTIONS}
    for index, finding in enumerate(spec.findings):
        section = _SECTION_OF_KIND[finding.kind]
        located = finding.lobe is not None or finding.side is not None
        if finding.drawn or located or rng.random() < 0.25:
            sentences[section].append(_finding_sentence(finding, index, rng, style))
        else:
            unlisted[section].append((index, finding))

    # 2. Negation lists, one per section or one for the whole report.
    closing: list[_Piece] = []
    if layout != "sections" and rng.random() < 0.5:
        everything = [item for section in _SECTIONS for item in unlisted[section]]
        if everything:
            closing.append(_negation_list(everything, rng, style))
    else:
        for section in _SECTIONS:
            if unlisted[section]:
                sentences[section].append(_negation_list(unlisted[section], rng, style))

    # 3. Normal statements where no drawn finding contradicts them.
    drawn_kinds = {finding.kind for finding in spec.findings if finding.drawn}
    listed_kinds = {finding.kind for finding in spec.findings}
    for section in _SECTIONS:
        ruling_out = drawn_kinds if section == "lungs" else listed_kinds
        for choices, blocking_kinds in phrases.BOILERPLATE[section]:
            if ruling_out & set(blocking_kinds):
                continue
            must_state = not sentences[section] and layout == "sections"
            if must_state or (section == "lungs" and spec.is_normal) or rng.random() < 0.5:
                sentences[section].append(_Piece(_choose(rng, choices)))
                if section == "bones":
                    break

    # 4. Lay the sections out.
    if layout == "sections":
        lines = [_join([_choose(rng, phrases.SECTION_HEADINGS[section])] + sentences[section], " ")
                 for section in _SECTIONS if sentences[section]]
        body = _join(lines, "\n")
        if rng.random() < 0.6:
            body = _join([body, _fill("IMPRESSION:\n{items}", {"items": _impression(spec.findings, rng, style)})],
                         "\n\n")
    else:
        body = _join([piece for section in _SECTIONS for piece in sentences[section]] + closing, " ")
        if layout == "findings_impression":
            separator = "\n" if rng.random() < 0.5 else " "
            body = _join([_fill("FINDINGS:" + separator + "{body}", {"body": body}),
                          _fill("IMPRESSION:" + separator + "{items}",
                                {"items": _impression(spec.findings, rng, style)})], "\n\n")

    mentions = sorted(Mention(index, start, end, spec.findings[index].assertion) for start, end, index in body.spans)
    return Report(text=body.text, mentions=tuple(sorted(mentions, key=lambda mention: mention.start)))
