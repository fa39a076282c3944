"""Entity record: validation and dict round trip."""

from __future__ import annotations

import json

import pytest

from medsyn_xai.ner.entity import Entity


def make_entity(**changes: object) -> Entity:
    fields: dict[str, object] = {
        "text": "pleural effusion",
        "label": "FINDING",
        "start": 5,
        "end": 21,
        "assertion": "absent",
        "backend": "rules",
        "backend_version": "1.0+abc",
    }
    fields.update(changes)
    return Entity(**fields)  # type: ignore[arg-type]  # keyword values checked by Entity


def test_entity_defaults_unaligned() -> None:
    entity = make_entity()

    assert entity.token_indices == ()
    assert entity.covered is None


def test_to_dict_keys_and_json() -> None:
    entity = make_entity(token_indices=(3, 4, 5), covered=True)

    data = entity.to_dict()

    for key in ("text", "label", "start", "end", "assertion", "token_indices", "covered"):
        assert key in data
    assert data["token_indices"] == [3, 4, 5]
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("covered", [None, True, False])
def test_dict_round_trip(covered: bool | None) -> None:
    entity = make_entity(token_indices=(7,), covered=covered)

    assert Entity.from_dict(entity.to_dict()) == entity


def test_from_dict_fills_optional_keys() -> None:
    data = {"text": "RUL", "label": "BODY_PART", "start": 0, "end": 3, "assertion": "present"}

    entity = Entity.from_dict(data)

    assert entity.backend == ""
    assert entity.token_indices == ()
    assert entity.covered is None


def test_entity_is_frozen() -> None:
    entity = make_entity()

    with pytest.raises(AttributeError):
        entity.start = 0  # type: ignore[misc]  # the assignment is what is tested


def test_invalid_label_rejected() -> None:
    with pytest.raises(ValueError, match=r"'DISEASE'.*FINDING, BODY_PART, MODIFIER"):
        make_entity(label="DISEASE")


def test_invalid_assertion_rejected() -> None:
    with pytest.raises(ValueError, match=r"'negated'.*present, absent, uncertain"):
        make_entity(assertion="negated")


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (9, 4)])
def test_invalid_offsets_rejected(start: int, end: int) -> None:
    with pytest.raises(ValueError, match=f"start={start} end={end}"):
        make_entity(start=start, end=end)
