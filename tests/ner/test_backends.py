"""Backend registry."""

from __future__ import annotations

import pytest

from medsyn_xai.ner import BACKEND_NAMES, NERBackend, get_backend


def test_rules_backend_by_name() -> None:
    backend = get_backend("rules")

    assert isinstance(backend, NERBackend)
    assert backend.name == "rules"
    assert isinstance(backend.version, str)
    assert [entity.text for entity in backend.extract("Small nodule.")] == ["Small", "nodule"]


def test_unknown_backend_lists_names() -> None:
    with pytest.raises(ValueError, match=r"'spacy-large'.*rules, transformer"):
        get_backend("spacy-large")


def test_backend_names() -> None:
    assert BACKEND_NAMES == ("rules", "transformer")


def test_transformer_needs_model_dir() -> None:
    with pytest.raises(TypeError, match="model_dir"):
        get_backend("transformer")


def test_rules_rejects_unknown_option() -> None:
    with pytest.raises(TypeError, match="model_dir"):
        get_backend("rules", model_dir="/nowhere")
