"""Clinical entities of a prompt: findings, anatomy and modifiers, with assertion.

``get_backend("rules").extract(prompt)`` returns :class:`Entity` objects with
character offsets; :func:`medsyn_xai.align.align_entities` then attaches the
encoder's token indices. The boundary conventions are described in
:mod:`medsyn_xai.ner.lexicon`, the assertion rules in :mod:`medsyn_xai.ner.assertion`.
"""

from medsyn_xai.ner.assertion import assign_assertions
from medsyn_xai.ner.backends import BACKEND_NAMES, NERBackend, get_backend
from medsyn_xai.ner.entity import ASSERTIONS, LABELS, Assertion, Entity, Label
from medsyn_xai.ner.evaluate import evaluate_ner, format_report, load_gold

__all__ = [
    "ASSERTIONS",
    "BACKEND_NAMES",
    "LABELS",
    "Assertion",
    "Entity",
    "Label",
    "NERBackend",
    "assign_assertions",
    "evaluate_ner",
    "format_report",
    "get_backend",
    "load_gold",
]
