"""Text encoder: token records, padding, truncation and folder errors."""

import shutil

import pytest
import torch

from medsyn_xai.text.encoder import TextEncoder, TextEncoderError, default_text_folder


def test_records_cover_prompt_with_offsets(text_encoder):
    prompt = "Pneumothorax in the RUL."
    encoded = text_encoder.encode(prompt)

    assert encoded.embeddings.shape == (1, text_encoder.max_tokens, 384)
    assert encoded.embeddings.dtype == torch.float32
    assert len(encoded.tokens) == text_encoder.max_tokens
    assert [record.index for record in encoded.tokens] == list(range(text_encoder.max_tokens))

    first, *rest = encoded.tokens
    assert first.special and first.text == "[CLS]"
    words = [record for record in rest if not record.special]
    assert "".join(prompt[r.start:r.end] for r in words) == prompt.replace(" ", "")
    assert words[0].text == "p"
    assert words[1].text.startswith("##")
    assert all(r.start == r.end == 0 for r in encoded.tokens if r.special)
    assert not encoded.truncated


def test_padding_is_kept_and_marked(text_encoder):
    encoded = text_encoder.encode("Clear lungs.")
    texts = [record.text for record in encoded.tokens]
    assert texts.count("[SEP]") == 1
    assert texts[-1] == "[PAD]"
    assert all(record.special for record in encoded.tokens if record.text == "[PAD]")


def test_long_prompt_is_truncated_and_flagged(text_encoder):
    prompt = "Small nodule in the right upper lobe. " * 20
    encoded = text_encoder.encode(prompt)
    assert encoded.truncated
    assert encoded.n_prompt_tokens > text_encoder.max_tokens
    assert encoded.tokens[-1].text == "[SEP]"


def test_same_prompt_same_embeddings(text_encoder):
    first = text_encoder.encode("Left pleural effusion.")
    second = text_encoder.encode("Left pleural effusion.")
    assert torch.equal(first.embeddings, second.embeddings)


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
def test_empty_prompt_rejected(text_encoder, prompt):
    with pytest.raises(TextEncoderError, match="prompt is empty"):
        text_encoder.encode(prompt)


def test_missing_folder_names_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TextEncoderError, match=str(missing)):
        TextEncoder(missing)


def test_folder_without_tokenizer_names_path(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(default_text_folder() / name, folder / name)
    with pytest.raises(TextEncoderError, match=str(folder)):
        TextEncoder(folder)


def test_too_many_tokens_for_encoder():
    with pytest.raises(TextEncoderError, match="max_tokens is 4096"):
        TextEncoder(max_tokens=4096)


def test_cxr_bert_style_folder_by_configuration(tmp_path):
    """A 768-wide BERT folder with 192 positions works through the same settings."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "cxr-bert-like"
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=1,
        num_attention_heads=12,
        intermediate_size=256,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_text_folder(), local_files_only=True).save_pretrained(folder)

    encoder = TextEncoder(folder, max_tokens=192)
    encoded = encoder.encode("Mild cardiomegaly.")
    assert encoded.embeddings.shape == (1, 192, 768)
    assert encoded.tokens[0].text == "[CLS]"
    assert encoded.tokens[-1].text == "[PAD]"
    assert encoder.description["hidden_size"] == 768


def test_attention_mask_marks_prompt_positions(text_encoder):
    prompt = "Nodule in the RUL."
    encoded = text_encoder.encode(prompt)
    padding = [record.text == "[PAD]" for record in encoded.tokens]

    assert encoded.attention_mask.shape == (1, text_encoder.max_tokens)
    assert encoded.attention_mask.dtype == torch.bool
    assert encoded.attention_mask[0].tolist() == [not pad for pad in padding]
    assert torch.equal(text_encoder.attention_mask(prompt), encoded.attention_mask[0])


def test_attention_mask_of_truncated_prompt_is_full(text_encoder):
    mask = text_encoder.attention_mask("nodule " * 200)
    assert mask.all()
