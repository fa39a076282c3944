"""Prompt files of the inbox: ``*.txt`` report text or ``*.json`` generation requests.

A ``.txt`` file contains the report text as UTF-8, and its study id is the file
stem. A leading UTF-8 byte order mark and the whitespace around the text (such as
the final line break) are dropped. A ``.json`` file contains one object::

    {"prompt": "...", "study_id": "case-7", "seed": 3, "guidance_scale": 2.0, "steps": 25}

where only ``prompt`` is required and ``study_id`` defaults to the file stem. Every
problem is reported as a :class:`PromptError` with a short code (the ``error`` field
of ``failed/<name>.error.json``) and a one-line message that names the value and
the fix.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsyn_xai.store import InvalidStudyIdError, validate_study_id

if TYPE_CHECKING:
    from medsyn_xai.pipeline.generate import GenerationRequest

__all__ = [
    "IGNORED_SUFFIXES",
    "JSON_KEYS",
    "PROMPT_SUFFIXES",
    "PromptError",
    "is_ignored_name",
    "parse_prompt_bytes",
    "read_prompt_file",
]

PROMPT_SUFFIXES = (".txt", ".json")
"""File name endings the inbox accepts, compared in lowercase."""

IGNORED_SUFFIXES = (".tmp", ".part", ".partial")
"""Endings of files still being written; the inbox leaves them alone until they are renamed."""

JSON_KEYS = ("prompt", "study_id", "seed", "guidance_scale", "steps")
"""Keys a ``.json`` prompt may hold; ``prompt`` is required."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_TYPES = {
    "prompt": ("a string", (str,)),
    "study_id": ("a string", (str,)),
    "seed": ("an integer", (int,)),
    "guidance_scale": ("a number", (int, float)),
    "steps": ("an integer", (int,)),
}


class PromptError(ValueError):
    """A prompt file that cannot become a generation request.

    Attributes:
        code: short machine-readable reason, for example "invalid_utf8" or
            "unknown_keys"; stored as ``error`` in ``<name>.error.json``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_ignored_name(name: str) -> bool:
    """Return True for names the inbox never touches: hidden (".x") or unfinished (.tmp, .part, .partial)."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def read_prompt_file(path: Path | str, *, max_bytes: int) -> GenerationRequest:
    """Read one prompt file without following links and turn it into a request.

    Args:
        path: the file, normally already claimed into ``inbox/.claimed/<worker>/``.
        max_bytes: size limit in bytes (``pipeline.max_prompt_bytes``).

    Returns:
        A checked request whose ``study_id`` is always set.

    Raises:
        PromptError: the file is a link, a folder or another special file, too
            large, not UTF-8 text, malformed JSON, or its request is invalid.
    """
    path = Path(path)
    name = path.name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise PromptError("missing", f"prompt file '{name}' disappeared before it was read: drop it again") from None
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(path)
        message = f"prompt file '{name}' is a symlink to '{target}': copy the file itself into the inbox"
        raise PromptError("symlink", message)
    if stat.S_ISDIR(info.st_mode):
        raise PromptError("not_a_file", f"'{name}' is a folder, not a prompt file: drop .txt or .json files")
    if not stat.S_ISREG(info.st_mode):
        raise PromptError("not_a_file", f"'{name}' is not a regular file: drop plain .txt or .json files")
    _check_size(name, info.st_size, max_bytes)

    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise PromptError("missing", f"prompt file '{name}' disappeared before it was read: drop it again") from None
    except OSError as error:
        message = f"prompt file '{name}' cannot be read ({error.strerror or error}): make it readable by the daemon's user"
        raise PromptError("unreadable", message) from None
    return parse_prompt_bytes(data, name=name, max_bytes=max_bytes)


def parse_prompt_bytes(data: bytes, *, name: str, max_bytes: int) -> GenerationRequest:
    """Turn the bytes of a prompt file called ``name`` into a checked request.

    Args:
        data: the file's contents.
        name: the file name; its ending picks the format and its stem is the
            default study id.
        max_bytes: size limit in bytes.

    Returns:
        A checked request whose ``study_id`` is always set.

    Raises:
        PromptError: see :func:`read_prompt_file`.
    """
    # Imported here so that listing and counting the inbox does not load torch.
    from medsyn_xai.pipeline.generate import GenerationRequest, check_request

    suffix = Path(name).suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        message = f"'{name}' has an unsupported ending {suffix or '(none)'!r}: name prompt files *.txt or *.json"
        raise PromptError("unsupported_type", message)
    _check_size(name, len(data), max_bytes)
    text = _decode(data, name)
    stem = Path(name).stem

    if suffix == ".txt":
        # Line breaks and spaces around the report are file layout, not report text.
        fields: dict[str, Any] = {"prompt": text.strip()}
    else:
        fields = _parse_json(text, name)
    study_id = fields.get("study_id", stem)
    if not fields["prompt"].strip():
        message = f"prompt file '{name}' contains no report text: write the report into it"
        raise PromptError("empty_prompt", message)

    try:
        validate_study_id(study_id)
    except InvalidStudyIdError as error:
        source = "its study_id" if "study_id" in fields else "its file name"
        fix = "set a valid study_id" if "study_id" in fields else "rename the file or give a study_id in a .json prompt"
        raise PromptError("invalid_study_id", f"prompt file '{name}': {source} is rejected ({error}); {fix}") from None

    request = GenerationRequest(
        prompt=fields["prompt"],
        study_id=study_id,
        seed=fields.get("seed"),
        steps=fields.get("steps"),
        guidance_scale=fields.get("guidance_scale"),
    )
    try:
        check_request(request)
    except ValueError as error:
        raise PromptError("invalid_request", f"prompt file '{name}': {error}") from None
    return request


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        message = (
            f"prompt file '{name}' is too large ({size} bytes, limit {max_bytes} bytes): "
            "shorten the report or raise pipeline.max_prompt_bytes"
        )
        raise PromptError("too_large", message)


def _decode(data: bytes, name: str) -> str:
    """Return the UTF-8 text of ``data`` or raise PromptError naming the encoding problem."""
    if data.startswith(_UTF16_BOMS):
        message = f"prompt file '{name}' is UTF-16 text (it starts with a UTF-16 byte order mark): save it as UTF-8"
        raise PromptError("utf16", message)
    if b"\x00" in data:
        offset = data.index(b"\x00")
        message = f"prompt file '{name}' is binary (NUL byte at offset {offset}): drop plain UTF-8 text"
        raise PromptError("binary", message)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        message = f"prompt file '{name}' is not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start}): save it as UTF-8"
        raise PromptError("invalid_utf8", message) from None


def _parse_json(text: str, name: str) -> dict[str, Any]:
    """Parse a ``.json`` prompt and check its keys and value types."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        message = f"prompt file '{name}' nests JSON too deeply: write one flat object such as {{\"prompt\": \"...\"}}"
        raise PromptError("invalid_json", message) from None
    except ValueError as error:
        message = f"prompt file '{name}' is not valid JSON ({error}): write one object such as {{\"prompt\": \"...\"}}"
        raise PromptError("invalid_json", message) from None
    if not isinstance(value, dict):
        message = (
            f"prompt file '{name}' holds a JSON {_json_kind(value)}, not an object: "
            "write one object such as {\"prompt\": \"...\"}"
        )
        raise PromptError("not_an_object", message)

    unknown = sorted(key for key in value if key not in JSON_KEYS)
    if unknown:
        message = f"prompt file '{name}' has unknown keys {unknown}: use only {', '.join(JSON_KEYS)}"
        raise PromptError("unknown_keys", message)
    if "prompt" not in value:
        message = f"prompt file '{name}' has no \"prompt\" key: add the report text as \"prompt\""
        raise PromptError("missing_prompt", message)
    for key, item in value.items():
        expected, types = _TYPES[key]
        if isinstance(item, bool) or not isinstance(item, types):
            message = f"prompt file '{name}': \"{key}\" is {_json_kind(item)} {item!r}, expected {expected}"
            raise PromptError("wrong_type", message)
    return value


def _reject_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number, so write a finite number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = item
    return result


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number" if not isinstance(value, float) or math.isfinite(value) else "non-finite number"
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)
