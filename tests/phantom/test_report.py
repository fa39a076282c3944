"""Tests of the report writer: spec consistency, mention spans, negation, hedging and variety."""

import re

import numpy as np
import pytest

from medsyn_xai.phantom import (
    FINDING_KINDS,
    Finding,
    PhantomSpec,
    generate_phantom,
    random_spec,
    write_report,
)

# Words that name each kind; written here independently of the writer's tables.
KIND_WORDS = {
    "nodule": ("nodule", "nodular"),
    "mass": ("mass",),
    "consolidation": ("consolidation", "consolidative"),
    "ground_glass": ("ground-glass", "ground glass", "ggo"),
    "atelectasis": ("atelectasis", "atelectatic"),
    "pleural_effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "emphysema": ("emphysema", "emphysematous"),
    "cardiomegaly": ("cardiomegaly", "cardiac enlargement", "enlarged"),
    "pericardial_effusion": ("pericardial",),
}
NEGATION = re.compile(r"\b(no|not|without|negative for|absent)\b", re.IGNORECASE)
HEDGE = re.compile(
    r"\b(possible|probable|likely|cannot exclude|suspicious for|questionable|may|suspected)\b", re.IGNORECASE
)


def _sentence_around(text: str, start: int, end: int) -> str:
    """Return the sentence containing text[start:end]. A period before a digit does not end a sentence."""
    boundaries = [-1]
    for position, character in enumerate(text):
        ends_sentence = character == "." and (position + 1 == len(text) or text[position + 1] in " \n")
        if ends_sentence or character == "\n":
            boundaries.append(position)
    boundaries.append(len(text))
    sentence_start = max(b for b in boundaries if b < start) + 1
    sentence_end = min(b for b in boundaries if b >= end)
    return text[sentence_start:sentence_end]


def _check_report(spec: PhantomSpec, seed: int) -> None:
    report = write_report(spec, seed)
    text = report.text
    for mention in report.mentions:
        assert 0 <= mention.start < mention.end <= len(text)
        assert mention.assertion == spec.findings[mention.finding].assertion

    for index, finding in enumerate(spec.findings):
        mentions = report.mentions_of(index)
        assert mentions, (seed, finding, text)
        for mention in mentions:
            span = text[mention.start:mention.end].lower()
            assert any(word in span for word in KIND_WORDS[finding.kind]), (seed, span, text)
            if finding.kind == "pleural_effusion":
                assert "pericardial" not in span
            sentence = _sentence_around(text, mention.start, mention.end)
            negated = NEGATION.search(sentence) is not None
            hedged = HEDGE.search(sentence) is not None
            if finding.assertion == "absent":
                assert negated, (seed, sentence)
            if finding.assertion == "uncertain":
                assert hedged, (seed, sentence)
                assert not negated, (seed, sentence)
            if finding.assertion == "present":
                assert not negated, (seed, sentence)
                assert not hedged, (seed, sentence)


def test_report_consistent_with_random_specs():
    for seed in range(400):
        _check_report(random_spec(seed, max_findings=4), seed)


def test_report_consistent_with_every_kind_and_assertion():
    seed = 0
    for kind in FINDING_KINDS:
        for assertion in ("present", "absent", "uncertain"):
            for _ in range(12):
                spec = random_spec(seed, kinds=(kind,), max_findings=1, p_normal=0.0)
                finding = spec.findings[0]
                values = {name: value for name, value in finding.to_dict().items() if name != "assertion"}
                if assertion == "absent":
                    values = {name: value for name, value in values.items() if name in ("kind", "lobe", "side")}
                spec = PhantomSpec(seed=seed, findings=(Finding(**values, assertion=assertion),))
                _check_report(spec, seed)
                seed += 1


def test_report_deterministic_by_seed():
    spec = random_spec(3, max_findings=4)
    assert write_report(spec, 11) == write_report(spec, 11)
    assert write_report(spec) == write_report(spec)
    generator_report = write_report(spec, np.random.default_rng(11))
    assert generator_report == write_report(spec, np.random.default_rng(11))


def test_report_text_varies_with_seed():
    spec = PhantomSpec(seed=0, findings=(Finding("nodule", lobe="RUL", size_mm=9.0),))
    texts = {write_report(spec, seed).text for seed in range(40)}
    assert len(texts) > 30


@pytest.mark.parametrize("kind", FINDING_KINDS)
def test_report_phrasings_per_kind(kind):
    sentences = set()
    for seed in range(80):
        spec = random_spec(seed, kinds=(kind,), max_findings=1, p_normal=0.0, p_uncertain=0.0)
        report = write_report(spec, seed)
        mention = report.mentions_of(0)[0]
        sentence = _sentence_around(report.text, mention.start, mention.end)
        sentences.add(re.sub(r"\d+(\.\d+)?", "N", sentence))
    assert len(sentences) >= 4


def test_report_normal_study():
    spec = PhantomSpec(seed=2)
    for seed in range(20):
        report = write_report(spec, seed)
        assert report.mentions == ()
        assert "clear" in report.text
    assert generate_phantom(spec, (32, 32, 32)).masks["lesion"].sum() == 0


def test_report_negation_list_names_all_three():
    findings = tuple(Finding(kind, assertion="absent") for kind in ("pleural_effusion", "pneumothorax", "cardiomegaly"))
    spec = PhantomSpec(seed=0, findings=findings)
    listed = []
    for seed in range(60):
        report = write_report(spec, seed)
        sentences = {_sentence_around(report.text, m.start, m.end) for m in report.mentions}
        listed.extend(sentence for sentence in sentences if all(
            any(word in sentence.lower() for word in KIND_WORDS[finding.kind]) for finding in findings))
    assert listed
    pattern = r"(No|no|Negative for) (evidence of )?pleural effusions?, pneumothorax,? or cardiomegaly"
    assert any(re.search(pattern, sentence) for sentence in listed)


def test_report_measurements_in_mm_and_cm():
    spec = PhantomSpec(seed=0, findings=(Finding("nodule", lobe="LLL", size_mm=12.0),))
    texts = " ".join(write_report(spec, seed).text for seed in range(60))
    assert "12 mm" in texts
    assert "1.2 cm" in texts
    assert "12 x 10 mm" in texts
    assert "1.2 x 1.0 cm" in texts


def test_report_lobe_names_and_abbreviations():
    spec = PhantomSpec(seed=0, findings=(Finding("consolidation", lobe="RUL"), Finding("atelectasis", lobe="lingula")))
    texts = " ".join(write_report(spec, seed).text for seed in range(60))
    assert "right upper lobe" in texts
    assert "RUL" in texts
    assert "lingula" in texts


def test_report_hedges_vary():
    spec = PhantomSpec(seed=0, findings=(Finding("pneumothorax", side="left", assertion="uncertain"),))
    cues = set()
    for seed in range(80):
        report = write_report(spec, seed)
        for mention in report.mentions:
            sentence = _sentence_around(report.text, mention.start, mention.end)
            cues.update(match.lower() for match in HEDGE.findall(sentence))
    assert len(cues) >= 4
    assert {"cannot exclude", "suspicious for", "possible", "likely"} <= cues


def test_report_layouts_vary():
    spec = random_spec(5, max_findings=3, p_normal=0.0)
    texts = [write_report(spec, seed).text for seed in range(40)]
    assert any("FINDINGS:" in text and "IMPRESSION:" in text for text in texts)
    assert any("IMPRESSION" not in text and "FINDINGS" not in text for text in texts)
    assert any(text.startswith(("LUNGS AND AIRWAYS:", "Lungs:")) for text in texts)


def test_report_invalid_seed_raises():
    with pytest.raises(ValueError, match="rng_or_seed"):
        write_report(PhantomSpec(seed=0), -4)
