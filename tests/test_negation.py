"""Negated entities hidden from the text encoder and cross-attention: masks, embeddings, studies, training."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from medsyn_xai.config import TrainSettings
from medsyn_xai.negation import NegationMasker
from medsyn_xai.pipeline.explain import StudyExplainer
from medsyn_xai.pipeline.generate import GenerationRequest, StudyGenerator
from medsyn_xai.render.overlays import entity_status
from medsyn_xai.store import StudyStore
from medsyn_xai.train import Trainer

PROMPT = "No consolidation in the left upper lobe. Spiculated nodule in the RUL."


@pytest.fixture(scope="module")
def masker():
    return NegationMasker()


def token_texts(tokens, indices) -> list[str]:
    return [tokens[index].text for index in indices]


def masked_settings(tiny_settings, *, hide: bool = True):
    """The tiny settings with a model that takes a cross-attention mask."""
    return replace(
        tiny_settings,
        text=replace(tiny_settings.text, hide_negated=hide),
        model=replace(tiny_settings.model, attend_to_padding=False),
    )


def test_negated_entity_tokens_hidden(masker, text_encoder):
    tokens = text_encoder.encode(PROMPT).tokens
    hidden = token_texts(tokens, masker.hidden_tokens(PROMPT, tokens))
    assert hidden == ["consolidation", "left", "upper", "lobe"]


def test_present_entity_tokens_kept(masker, text_encoder):
    tokens = text_encoder.encode(PROMPT).tokens
    hidden = set(masker.hidden_tokens(PROMPT, tokens))
    second_sentence = PROMPT.index("Spiculated")
    visible = {token.index for token in tokens if not token.special and token.start >= second_sentence}
    assert len(visible) >= 5
    assert not visible & hidden
    assert tokens[1].text == "no"
    assert 1 not in hidden


def test_mask_leaves_input_unchanged(masker, text_encoder):
    encoded = text_encoder.encode(PROMPT)
    before = encoded.attention_mask.clone()
    masked = masker.mask(PROMPT, encoded.tokens, encoded.attention_mask)
    assert torch.equal(encoded.attention_mask, before)
    assert int(before.sum() - masked.sum()) == 4


def test_prompt_without_negation_unchanged(masker, text_encoder):
    prompt = "Spiculated nodule in the RUL."
    encoded = text_encoder.encode(prompt)
    assert torch.equal(masker.mask(prompt, encoded.tokens, encoded.attention_mask), encoded.attention_mask)
    assert torch.equal(masker.encode(text_encoder, prompt).embeddings, encoded.embeddings)


def test_one_dimensional_mask(masker, text_encoder):
    encoded = text_encoder.encode(PROMPT)
    flat = masker.mask(PROMPT, encoded.tokens, encoded.attention_mask[0])
    assert torch.equal(flat, masker.encode(text_encoder, PROMPT).attention_mask[0])


def test_hidden_word_leaves_no_trace(masker, text_encoder):
    first = masker.encode(text_encoder, "No consolidation. The lungs are clear.")
    second = masker.encode(text_encoder, "No mass. The lungs are clear.")
    assert torch.equal(first.attention_mask, second.attention_mask)
    visible = first.attention_mask[0]
    assert int((~visible[:10]).sum()) == 1
    assert torch.allclose(first.embeddings[0, visible], second.embeddings[0, visible], atol=1e-5)


def test_shown_word_changes_other_tokens(text_encoder):
    first = text_encoder.encode("No consolidation. The lungs are clear.")
    second = text_encoder.encode("No mass. The lungs are clear.")
    visible = first.attention_mask[0]
    assert not torch.allclose(first.embeddings[0, visible], second.embeddings[0, visible], atol=1e-3)


def test_study_records_hidden_tokens(tmp_path, tiny_settings, text_encoder, masker):
    generator = StudyGenerator(masked_settings(tiny_settings), text_encoder=text_encoder)
    path = generator.generate(GenerationRequest(prompt=PROMPT, study_id="hidden", seed=1), tmp_path)

    store = StudyStore.open(path)
    hidden = store.attrs["hidden_tokens"]
    assert hidden == list(masker.hidden_tokens(PROMPT, text_encoder.encode(PROMPT).tokens))
    saliency = store.saliency()
    assert np.all(saliency[hidden] == 0)
    assert np.allclose(saliency.sum(axis=0), 1.0, atol=1e-5)
    assert store.summary()["hidden_tokens"] == ["consolidation", "left upper lobe"]
    assert store.attrs["hide_negated"] is True


def test_negated_entity_heatmap_is_zero(tmp_path, tiny_settings, text_encoder):
    generator = StudyGenerator(masked_settings(tiny_settings), text_encoder=text_encoder)
    path = generator.generate(GenerationRequest(prompt=PROMPT, study_id="zero", seed=1), tmp_path)

    result = StudyExplainer.from_settings(tiny_settings.ner).explain(path)
    heatmaps = StudyStore.open(path).entity_heatmaps
    for index, entity in enumerate(result.entities):
        total = float(heatmaps[index].sum())
        assert (total == 0.0) == (entity.assertion == "absent"), entity.text


def test_generator_reuses_rules_backend(tiny_settings, text_encoder, masker):
    generator = StudyGenerator(masked_settings(tiny_settings), text_encoder=text_encoder, ner_backend=masker.backend)
    assert generator.negation_masker.backend is masker.backend


def test_hiding_off_keeps_every_token(tmp_path, tiny_settings, text_encoder):
    generator = StudyGenerator(masked_settings(tiny_settings, hide=False), text_encoder=text_encoder)
    path = generator.generate(GenerationRequest(prompt=PROMPT, study_id="shown", seed=1), tmp_path)
    assert StudyStore.open(path).attrs["hidden_tokens"] == []
    assert StudyStore.open(path).attrs["hide_negated"] is False


def test_word_pieces_read_as_prompt_text(tmp_path, tiny_settings, text_encoder):
    prompt = "No pleural effusion or pneumothorax. Mass in the RUL."
    generator = StudyGenerator(masked_settings(tiny_settings), text_encoder=text_encoder)
    path = generator.generate(GenerationRequest(prompt=prompt, study_id="pieces", seed=1), tmp_path)
    assert StudyStore.open(path).summary()["hidden_tokens"] == ["pleural effusion", "pneumothorax"]


def test_padding_attending_model_unmasked(tmp_path, tiny_settings, text_encoder):
    settings = replace(masked_settings(tiny_settings), model=tiny_settings.model)
    generator = StudyGenerator(settings, text_encoder=text_encoder)
    assert generator.negation_masker is None
    path = generator.generate(GenerationRequest(prompt=PROMPT, study_id="whole", seed=1), tmp_path)
    assert StudyStore.open(path).attrs["hidden_tokens"] == []
    assert StudyStore.open(path).attrs["hide_negated"] is False


def test_training_text_matches_sampling(tmp_path, tiny_settings, text_encoder, masker):
    settings = replace(
        masked_settings(tiny_settings),
        train=TrainSettings(out_dir=str(tmp_path), cases=2, batch_size=2, steps=1, phantom_shape=(16, 16, 16)),
    )
    trainer = Trainer(settings, text_encoder=text_encoder)
    expected = masker.encode(text_encoder, PROMPT)
    assert torch.equal(trainer._attention_mask(PROMPT), expected.attention_mask[0])
    assert torch.allclose(trainer.text_cache.get(PROMPT), expected.embeddings[0], atol=1e-2)


def test_batch_encoding_hides_like_single(masker, text_encoder):
    tokens = text_encoder.tokenize(PROMPT)[0]
    hidden = masker.hidden_tokens(PROMPT, tokens)
    batch = text_encoder.encode_batch([PROMPT, "Nodule in the RUL."], hidden=[hidden, ()])
    assert torch.allclose(batch[0], masker.encode(text_encoder, PROMPT).embeddings[0], atol=1e-5)
    assert torch.allclose(batch[1], text_encoder.encode("Nodule in the RUL.").embeddings[0], atol=1e-5)


def test_later_batches_hide_too(masker, text_encoder):
    tokens = text_encoder.tokenize(PROMPT)[0]
    hidden = masker.hidden_tokens(PROMPT, tokens)
    batch = text_encoder.encode_batch(["Nodule in the RUL.", PROMPT], batch_size=1, hidden=[(), hidden])
    assert torch.allclose(batch[1], masker.encode(text_encoder, PROMPT).embeddings[0], atol=1e-5)


def test_hidden_position_out_of_range(text_encoder):
    with pytest.raises(ValueError, match="hidden token position 99 is outside"):
        text_encoder.encode(PROMPT, hidden=(99,))


def test_batch_hidden_count_mismatch(text_encoder):
    with pytest.raises(ValueError, match="hidden has 1 entries for 2 prompts"):
        text_encoder.encode_batch([PROMPT, PROMPT], hidden=[()])


def test_status_line_names_hidden_entity():
    hidden = {"assertion": "absent", "token_indices": [3, 4], "covered": True}
    partly_hidden = {"assertion": "absent", "token_indices": [3, 5], "covered": True}
    assert "hidden from the model" in entity_status(hidden, [3, 4, 7])[0]
    assert "hidden from the model" not in entity_status(partly_hidden, [3, 4, 7])[0]
