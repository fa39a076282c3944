"""The record kept for every token position of an encoded prompt."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TokenRecord"]


@dataclass(frozen=True)
class TokenRecord:
    """One token position of an encoded prompt.

    Attributes:
        index: position in the encoder's sequence, 0-based, padding included.
        text: the tokenizer's token string (for example ``"##ule"`` or ``"[PAD]"``).
        start: character offset of the token's first character in the prompt.
        end: character offset one past the token's last character. Special and
            padding tokens have ``start == end == 0``.
        special: True for [CLS], [SEP], [PAD] and every other added token that
            covers no prompt text.
    """

    index: int
    text: str
    start: int
    end: int
    special: bool

    def to_dict(self) -> dict[str, int | str | bool]:
        """Return the record as a JSON-ready dict with keys index, text, start, end, special."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TokenRecord":
        """Build a record from :meth:`to_dict` output."""
        return cls(
            index=int(data["index"]),
            text=str(data["text"]),
            start=int(data["start"]),
            end=int(data["end"]),
            special=bool(data["special"]),
        )
