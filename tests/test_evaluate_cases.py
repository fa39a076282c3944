"""Held-out evaluation cases: kinds, seeds and the finding word's tokens."""

from medsyn_xai.config import EVAL_SEED_OFFSET
from medsyn_xai.evaluate import CASE_KINDS, finding_tokens, held_out_case


def test_held_out_kinds_cycle():
    cases = [held_out_case(index, seed=3) for index in range(8)]

    assert [case.kind for case in cases] == [CASE_KINDS[index % len(CASE_KINDS)] for index in range(8)]
    assert [case.seed for case in cases] == [EVAL_SEED_OFFSET + 3 + index for index in range(8)]


def test_held_out_case_repeats():
    first = held_out_case(5)
    again = held_out_case(5)

    assert first.report.text == again.report.text
    assert first.spec == again.spec


def test_finding_tokens_cover_mention(text_encoder):
    case = held_out_case(0)
    encoded = text_encoder.encode(case.report.text)
    mention = case.report.mentions_of(0)[0]

    tokens = finding_tokens(case, encoded.tokens)
    words = "".join(encoded.tokens[index].text.removeprefix("##") for index in tokens)

    assert tokens
    assert words == case.report.text[mention.start : mention.end].lower().replace(" ", "").replace("-", "")
