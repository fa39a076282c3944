"""Synthetic chest CT phantoms with known lobe, airway, vessel and lesion masks, and matching reports.

The package depends only on numpy, scipy and the standard library. Arrays are
(Z, Y, X): x from the patient's right to left, y from anterior to posterior,
z from inferior to superior. CT values are HU.
"""

from medsyn_xai.phantom.generate import CT_RANGE_HU, MASK_KEYS, Phantom, generate_phantom
from medsyn_xai.phantom.geometry import FIELD_OF_VIEW_MM
from medsyn_xai.phantom.report import HEDGE_CUES, NEGATION_CUES, Mention, Report, write_report
from medsyn_xai.phantom.spec import (
    ASSERTIONS,
    EXTENTS,
    FINDING_KINDS,
    FINDING_LOBES,
    LOBE_LABELS,
    LOBE_SIDES,
    LOBES,
    MASS_MIN_MM,
    SIDES,
    SIZES,
    ZONES,
    AnatomyParams,
    Finding,
    PhantomSpec,
    lobe_label,
    random_spec,
    sample_anatomy,
)

__all__ = [
    "ASSERTIONS",
    "CT_RANGE_HU",
    "EXTENTS",
    "FIELD_OF_VIEW_MM",
    "FINDING_KINDS",
    "FINDING_LOBES",
    "HEDGE_CUES",
    "LOBES",
    "LOBE_LABELS",
    "LOBE_SIDES",
    "MASK_KEYS",
    "MASS_MIN_MM",
    "NEGATION_CUES",
    "SIDES",
    "SIZES",
    "ZONES",
    "AnatomyParams",
    "Finding",
    "Mention",
    "Phantom",
    "PhantomSpec",
    "Report",
    "generate_phantom",
    "lobe_label",
    "random_spec",
    "sample_anatomy",
    "write_report",
]
