"""The clinical entity found in a prompt: a labelled character span with its assertion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ASSERTIONS", "LABELS", "Assertion", "Entity", "Label"]

Label = Literal["FINDING", "BODY_PART", "MODIFIER"]
Assertion = Literal["present", "absent", "uncertain"]

LABELS: tuple[Label, ...] = ("FINDING", "BODY_PART", "MODIFIER")
ASSERTIONS: tuple[Assertion, ...] = ("present", "absent", "uncertain")


@dataclass(frozen=True)
class Entity:
    """One clinical entity of a prompt.

    Attributes:
        text: the prompt's characters ``prompt[start:end]``.
        label: "FINDING", "BODY_PART" or "MODIFIER".
        start: character offset of the first character in the prompt, 0-based.
        end: character offset one past the last character (exclusive).
        assertion: "present", "absent" or "uncertain".
        backend: name of the backend that found the entity, for example "rules".
        backend_version: version string of that backend; it changes when its
            lexicon, rules or model change.
        token_indices: positions in the encoder's token sequence whose character
            spans overlap the entity, ascending. Empty until aligned.
        covered: None before alignment; True when at least one non-special token
            overlaps the entity; False when none does, which happens when the
            entity lies past the truncated token window.

    Raises:
        ValueError: on an unknown label or assertion, or offsets with
            ``start < 0`` or ``end < start``.
    """

    text: str
    label: Label
    start: int
    end: int
    assertion: Assertion
    backend: str
    backend_version: str
    token_indices: tuple[int, ...] = ()
    covered: bool | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            message = f"invalid entity label {self.label!r}: use one of {', '.join(LABELS)}"
            raise ValueError(message)
        if self.assertion not in ASSERTIONS:
            message = (
                f"invalid entity assertion {self.assertion!r}: use one of {', '.join(ASSERTIONS)}"
            )
            raise ValueError(message)
        if self.start < 0 or self.end < self.start:
            message = (
                f"invalid entity offsets start={self.start} end={self.end}: need 0 <= start <= end"
            )
            raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; ``token_indices`` becomes a list."""
        return {
            "text": self.text,
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "assertion": self.assertion,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "token_indices": list(self.token_indices),
            "covered": self.covered,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entity:
        """Build an entity from :meth:`to_dict` output.

        ``backend``, ``backend_version``, ``token_indices`` and ``covered`` may be
        missing and then take "", "", () and None.
        """
        covered = data.get("covered")
        return cls(
            text=str(data["text"]),
            label=data["label"],
            start=int(data["start"]),
            end=int(data["end"]),
            assertion=data["assertion"],
            backend=str(data.get("backend", "")),
            backend_version=str(data.get("backend_version", "")),
            token_indices=tuple(int(index) for index in data.get("token_indices", ())),
            covered=None if covered is None else bool(covered),
        )
