"""Prompt files of the inbox: accepted formats and every rejection with its reason."""

import json
import os

import pytest

from medsyn_xai.pipeline.prompts import PromptError, is_ignored_name, parse_prompt_bytes, read_prompt_file

LIMIT = 65536
REPORT = "Spiculated nodule in the right upper lobe. No pleural effusion."


def parse(name: str, data: bytes | str):
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return parse_prompt_bytes(raw, name=name, max_bytes=LIMIT)


def test_txt_prompt_takes_study_id_from_stem():
    request = parse("case-7.txt", REPORT + "\n")
    assert request.prompt == REPORT
    assert request.study_id == "case-7"
    assert (request.seed, request.steps, request.guidance_scale) == (None, None, None)


def test_utf8_bom_is_dropped():
    assert parse("bom.txt", b"\xef\xbb\xbf" + REPORT.encode()).prompt == REPORT


def test_json_prompt_with_every_key():
    text = json.dumps({"prompt": REPORT, "study_id": "lung.01", "seed": 3, "guidance_scale": 2, "steps": 25})
    request = parse("whatever.json", text)
    assert request.study_id == "lung.01"
    assert (request.seed, request.steps, request.guidance_scale) == (3, 25, 2)


def test_json_prompt_text_is_kept_exactly():
    assert parse("exact.json", json.dumps({"prompt": " " + REPORT + "\n"})).prompt == " " + REPORT + "\n"


def test_json_prompt_defaults_study_id_to_stem():
    assert parse("from-stem.json", json.dumps({"prompt": REPORT})).study_id == "from-stem"


def test_non_ascii_report_is_kept():
    text = "Kleiner Rundherd im rechten Oberlappen, 5 mm — kein Erguss."
    assert parse("de.txt", text).prompt == text


BAD_BYTES = [
    ("empty.txt", b"", "empty_prompt", "no report text"),
    ("blank.txt", b" \n\t  \r\n", "empty_prompt", "no report text"),
    ("png.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary", "binary"),
    ("latin1.txt", "Nodule in the lung, größer".encode("latin-1"), "invalid_utf8", "not valid UTF-8"),
    ("utf16.txt", REPORT.encode("utf-16"), "utf16", "UTF-16"),
    ("utf16be.txt", b"\xfe\xff" + REPORT.encode("utf-16-be"), "utf16", "UTF-16"),
    ("big.txt", b"a" * (LIMIT + 1), "too_large", "too large"),
    ("truncated.json", b'{"prompt": "nodule",', "invalid_json", "not valid JSON"),
    ("list.json", b'["a nodule"]', "not_an_object", "list"),
    ("string.json", b'"a nodule"', "not_an_object", "string"),
    ("number-prompt.json", b'{"prompt": 5}', "wrong_type", '"prompt"'),
    ("null-prompt.json", b'{"prompt": null}', "wrong_type", '"prompt"'),
    ("seed-text.json", b'{"prompt": "x", "seed": "7"}', "wrong_type", '"seed"'),
    ("steps-float.json", b'{"prompt": "x", "steps": 2.5}', "wrong_type", '"steps"'),
    ("steps-bool.json", b'{"prompt": "x", "steps": true}', "wrong_type", '"steps"'),
    ("scale-text.json", b'{"prompt": "x", "guidance_scale": "high"}', "wrong_type", '"guidance_scale"'),
    ("unknown.json", b'{"prompt": "x", "temperature": 0.7}', "unknown_keys", "temperature"),
    ("missing.json", b'{"study_id": "m"}', "missing_prompt", '"prompt"'),
    ("blank-prompt.json", b'{"prompt": "   "}', "empty_prompt", "no report text"),
    ("twice.json", b'{"prompt": "a", "prompt": "b"}', "invalid_json", "twice"),
    ("nan.json", b'{"prompt": "x", "guidance_scale": NaN}', "invalid_json", "NaN"),
    ("inf.json", b'{"prompt": "x", "steps": Infinity}', "invalid_json", "Infinity"),
    ("deep.json", b"[" * 30000 + b"]" * 30000, "invalid_json", "deeply"),
    ("traversal.json", b'{"prompt": "x", "study_id": "../../etc/evil"}', "invalid_study_id", "../../etc/evil"),
    ("absolute.json", b'{"prompt": "x", "study_id": "/tmp/abs"}', "invalid_study_id", "/tmp/abs"),
    ("dotdot.json", b'{"prompt": "x", "study_id": ".."}', "invalid_study_id", "'..'"),
    ("bad name.txt", REPORT.encode(), "invalid_study_id", "file name"),
    ("negative-steps.json", b'{"prompt": "x", "steps": -5}', "invalid_request", "steps is -5"),
    ("huge-steps.json", b'{"prompt": "x", "steps": 1000000000}', "invalid_request", "steps is 1000000000"),
    ("zero-steps.json", b'{"prompt": "x", "steps": 0}', "invalid_request", "steps is 0"),
    ("absurd-scale.json", b'{"prompt": "x", "guidance_scale": 1e9}', "invalid_request", "guidance scale"),
    ("negative-scale.json", b'{"prompt": "x", "guidance_scale": -1}', "invalid_request", "guidance scale"),
    ("negative-seed.json", b'{"prompt": "x", "seed": -1}', "invalid_request", "seed is -1"),
    ("report.docx", b"PK\x03\x04", "unsupported_type", ".docx"),
]


@pytest.mark.parametrize(("name", "data", "code", "fragment"), BAD_BYTES, ids=[case[0] for case in BAD_BYTES])
def test_bad_prompt_rejected_with_reason(name, data, code, fragment):
    with pytest.raises(PromptError) as caught:
        parse(name, data)
    assert caught.value.code == code
    message = str(caught.value)
    assert fragment in message
    assert f"'{name}'" in message
    assert "\n" not in message


def test_symlink_rejected_without_reading_target(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the sampler")
    (inbox / "link.txt").symlink_to(secret)
    with pytest.raises(PromptError) as caught:
        read_prompt_file(inbox / "link.txt", max_bytes=LIMIT)
    assert caught.value.code == "symlink"
    assert "symlink" in str(caught.value)
    assert str(secret) in str(caught.value)


def test_folder_named_like_prompt_rejected(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(PromptError) as caught:
        read_prompt_file(tmp_path / "folder.txt", max_bytes=LIMIT)
    assert caught.value.code == "not_a_file"
    assert "folder" in str(caught.value)


def test_fifo_rejected_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(PromptError) as caught:
        read_prompt_file(tmp_path / "pipe.txt", max_bytes=LIMIT)
    assert caught.value.code == "not_a_file"


def test_size_limit_checked_before_reading(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 101)
    with pytest.raises(PromptError, match="101 bytes, limit 100 bytes"):
        read_prompt_file(path, max_bytes=100)


def test_read_prompt_file_round_trip(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"prompt": REPORT, "steps": 2}))
    request = read_prompt_file(path, max_bytes=LIMIT)
    assert (request.prompt, request.study_id, request.steps) == (REPORT, "ok", 2)


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".hidden.txt", True),
        ("draft.txt.tmp", True),
        ("upload.json.part", True),
        ("upload.PARTIAL", True),
        ("case.txt", False),
        ("case.json", False),
        ("notes.md", False),
    ],
)
def test_ignored_names(name, ignored):
    assert is_ignored_name(name) is ignored
