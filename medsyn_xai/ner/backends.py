"""Backend registry: build an entity extractor by name."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from medsyn_xai.ner.entity import Entity

__all__ = ["BACKEND_NAMES", "NERBackend", "get_backend"]

BACKEND_NAMES: tuple[str, ...] = ("rules", "transformer")


@runtime_checkable
class NERBackend(Protocol):
    """Interface of an entity extractor.

    Attributes:
        name: registry name, for example "rules".
        version: string that changes whenever the backend's output could change
            (lexicon, rules, model weights or label map); caches key on it.
    """

    name: str
    version: str

    def extract(self, text: str) -> list[Entity]:
        """Return the entities of ``text`` sorted by start offset; [] for blank text."""
        ...


def get_backend(name: str, **options: Any) -> NERBackend:
    """Build the backend registered as ``name``.

    Args:
        name: "rules" (lexicon and ConText rules, offline, no options) or
            "transformer" (a local token-classification folder; options are the
            keyword arguments of :class:`~medsyn_xai.ner.transformer.TransformerBackend`,
            ``model_dir`` required).
        **options: passed to the backend's constructor.

    Raises:
        ValueError: ``name`` is not a registered backend.
        TypeError: an option the backend does not take, or a missing ``model_dir``.
    """
    if name == "rules":
        from medsyn_xai.ner.rules import RulesBackend

        return RulesBackend(**options)
    if name == "transformer":
        from medsyn_xai.ner.transformer import TransformerBackend

        return TransformerBackend(**options)

    message = f"unknown NER backend {name!r}: use one of {', '.join(BACKEND_NAMES)}"
    raise ValueError(message)
