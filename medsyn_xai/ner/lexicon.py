"""Chest CT vocabulary of the rules backend: findings, anatomy and modifiers.

Entity boundaries follow these conventions, and the gold set is annotated by them:

* A FINDING is an abnormal observation ("nodule", "consolidation"). An anatomical
  adjective in front of it is a separate BODY_PART ("mediastinal" +
  "lymphadenopathy"), unless adjective and noun form a fixed clinical term listed
  here ("pleural effusion", "pulmonary embolism", "pulmonary nodule",
  "ground-glass opacity"), while "lung" + "nodule" stays two entities.
* A BODY_PART is an anatomical noun or adjective. A laterality word directly in
  front of it belongs to it, so "right upper lobe", "left lung" and "bilateral
  lower lobes" are one BODY_PART each.
* A MODIFIER is a laterality word in front of anything but anatomy ("left" in
  "left pleural effusion"), a measurement with its unit ("1.2 x 0.8 cm"), or a
  severity, size, distribution, morphology, change, chronicity, cause or count
  word.
* Articles and prepositions are never part of an entity, so "posterior segment of
  the right lower lobe" is two BODY_PART entities.

Each countable noun also matches its plural, each hyphenated term also matches
its spaced spelling ("ground glass"), and a few frequent misspellings
("pnuemothorax", "effussion") match as well.

NOTE: matching ignores grammar, so a bare "ground-glass" is always a FINDING, even
where it is an adjective joined to another ("ground-glass and solid nodules").
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

from medsyn_xai.ner.entity import LABELS, Label

__all__ = [
    "LATERALITY",
    "MEASUREMENT_PATTERN",
    "Lexicon",
    "build_lexicon",
    "pluralize",
]

FINDING_NOUNS: tuple[str, ...] = (
    "abnormality",
    "abscess",
    "adenopathy",
    "air bronchogram",
    "aneurysm",
    "aspiration pneumonia",
    "atelectasis",
    "bleb",
    "bulla",
    "calcification",
    "cancer",
    "carcinoma",
    "cavity",
    "collapse",
    "compression fracture",
    "consolidation",
    "cyst",
    "dissection",
    "effusion",
    "embolus",
    "empyema",
    "exacerbation",
    "fracture",
    "GGO",
    "granuloma",
    "ground-glass nodule",
    "ground-glass opacity",
    "hernia",
    "hiatal hernia",
    "infection",
    "infiltrate",
    "lesion",
    "low lung volume",
    "lung cancer",
    "malignancy",
    "mass",
    "metastasis",
    "micronodule",
    "neoplasm",
    "nodule",
    "opacity",
    "osteophyte",
    "parapneumonic effusion",
    "pericardial effusion",
    "plaque",
    "pleural effusion",
    "pleural plaque",
    "pneumonia",
    "pneumothorax",
    "pulmonary embolism",
    "pulmonary nodule",
    "recurrence",
    "scar",
    "septic embolus",
    "thrombus",
    "thymoma",
    "tree-in-bud opacity",
    "tumor",
)
"""Countable finding nouns; each also matches its plural."""

FINDING_TERMS: tuple[str, ...] = (
    "air trapping",
    "airspace disease",
    "aspiration",
    "atherosclerosis",
    "bronchial wall thickening",
    "bronchiectasis",
    "bronchiolectasis",
    "bronchiolitis",
    "cardiomegaly",
    "congestive heart failure",
    "COPD",
    "crazy-paving",
    "destruction",
    "edema",
    "emphysema",
    "enlargement",
    "fibrosis",
    "flattening",
    "fluid",
    "fluid overload",
    "goiter",
    "granulomatous disease",
    "ground-glass",
    "ground-glass opacification",
    "heart failure",
    "hemorrhage",
    "hemothorax",
    "honeycombing",
    "hydropneumothorax",
    "hyperinflation",
    "ILD",
    "inflammation",
    "interlobular septal thickening",
    "interstitial lung disease",
    "lymphadenopathy",
    "mediastinal shift",
    "metastatic disease",
    "mosaic attenuation",
    "mucoid impaction",
    "mucus plugging",
    "nodularity",
    "NSIP",
    "opacification",
    "pericardial thickening",
    "pleural fluid",
    "pleural thickening",
    "pneumomediastinum",
    "pneumonitis",
    "pulmonary edema",
    "pulmonary fibrosis",
    "pulmonary hypertension",
    "pulmonary venous congestion",
    "reactive airway disease",
    "reticulation",
    "sarcoidosis",
    "scarring",
    "septal thickening",
    "subcutaneous emphysema",
    "thickening",
    "traction bronchiectasis",
    "tree-in-bud",
    "tuberculosis",
    "UIP",
    "volume loss",
    "wall thickening",
)
"""Finding terms without a plural in use (mass nouns, named diseases)."""

ANATOMY_NOUNS: tuple[str, ...] = (
    "adrenal gland",
    "airway",
    "anterior basal segment",
    "anterior segment",
    "apex",
    "apical segment",
    "apicoposterior segment",
    "artery",
    "axilla",
    "basal segment",
    "base",
    "breast",
    "bronchiole",
    "bronchus",
    "cardiophrenic angle",
    "chest wall",
    "clavicle",
    "coronary artery",
    "costophrenic angle",
    "fissure",
    "great vessel",
    "hemidiaphragm",
    "hemithorax",
    "hilum",
    "inferior lingular segment",
    "kidney",
    "lateral basal segment",
    "lateral segment",
    "lobe",
    "lower hemithorax",
    "lower lobe",
    "lower zone",
    "lung",
    "lung apex",
    "lung base",
    "lymph node",
    "main bronchus",
    "mainstem bronchus",
    "major fissure",
    "medial basal segment",
    "medial segment",
    "mid zone",
    "middle lobe",
    "minor fissure",
    "node",
    "pleural space",
    "pleural surface",
    "posterior basal segment",
    "posterior segment",
    "pulmonary artery",
    "pulmonary vein",
    "rib",
    "scapula",
    "segment",
    "superior lingular segment",
    "superior segment",
    "upper hemithorax",
    "upper lobe",
    "upper zone",
    "vein",
    "ventricle",
    "vertebra",
    "vertebral body",
    "vessel",
)
"""Countable anatomical nouns; each also matches its plural."""

ANATOMY_TERMS: tuple[str, ...] = (
    "anterior mediastinum",
    "aorta",
    "aortic",
    "aortic arch",
    "apical",
    "ascending aorta",
    "axillary",
    "basal",
    "basilar",
    "biapical",
    "bibasal",
    "bibasilar",
    "cardiac",
    "cardiopulmonary",
    "carina",
    "chest",
    "coronary",
    "descending aorta",
    "diaphragm",
    "endobronchial",
    "esophagus",
    "heart",
    "hilar",
    "interstitium",
    "intrapulmonary",
    "lingula",
    "lingular",
    "liver",
    "LLL",
    "LUL",
    "lung parenchyma",
    "mediastinal",
    "mediastinum",
    "middle mediastinum",
    "nodal",
    "osseous",
    "paraspinal",
    "paratracheal",
    "parenchyma",
    "parenchymal",
    "pericardial",
    "pericardium",
    "perifissural",
    "perihilar",
    "pleura",
    "pleural",
    "pleural-based",
    "pleural-parenchymal",
    "pleuroparenchymal",
    "posterior mediastinum",
    "precarinal",
    "prevascular",
    "pulmonary",
    "pulmonary trunk",
    "retrocardiac",
    "RLL",
    "RML",
    "RUL",
    "spine",
    "spleen",
    "sternum",
    "subcarinal",
    "subpleural",
    "superior vena cava",
    "supraclavicular",
    "thoracic aorta",
    "thoracic spine",
    "thorax",
    "thyroid",
    "thyroid gland",
    "trachea",
    "tracheal",
    "upper abdomen",
    "ventricular",
)
"""Anatomical adjectives, mass nouns and lobe abbreviations, matched as written."""

LATERALITY: tuple[str, ...] = (
    "bilateral",
    "bilaterally",
    "left",
    "left-sided",
    "right",
    "right-sided",
    "unilateral",
)
"""Laterality words: a MODIFIER, or the start of a BODY_PART they directly precede."""

MODIFIER_TERMS: dict[str, tuple[str, ...]] = {
    "severity": (
        "complete",
        "enlarged",
        "extensive",
        "large",
        "marked",
        "markedly",
        "massive",
        "mild",
        "mildly",
        "minimal",
        "moderate",
        "moderately",
        "moderate-sized",
        "prominent",
        "severe",
        "severely",
        "slight",
        "slightly",
        "small",
        "subcentimeter",
        "subtle",
        "tiny",
        "trace",
    ),
    "distribution": (
        "airspace",
        "alveolar",
        "central",
        "centrilobular",
        "confluent",
        "dependent",
        "diffuse",
        "diffusely",
        "focal",
        "interstitial",
        "lobar",
        "multifocal",
        "panlobular",
        "paraseptal",
        "patchy",
        "peribronchovascular",
        "perilymphatic",
        "peripheral",
        "scattered",
        "segmental",
        "subsegmental",
    ),
    "morphology": (
        "atherosclerotic",
        "calcified",
        "cavitary",
        "cavitating",
        "compressive",
        "consolidative",
        "cylindrical",
        "cystic",
        "dense",
        "dilated",
        "displaced",
        "enhancing",
        "fibrotic",
        "hyperexpanded",
        "hyperinflated",
        "ill-defined",
        "irregular",
        "linear",
        "lobulated",
        "loculated",
        "lytic",
        "nodular",
        "noncalcified",
        "non-calcified",
        "non-displaced",
        "nondisplaced",
        "partially calcified",
        "part-solid",
        "passive",
        "patulous",
        "pure",
        "reticular",
        "round",
        "rounded",
        "sclerotic",
        "smooth",
        "solid",
        "spiculated",
        "subsolid",
        "thick-walled",
        "thin-walled",
        "varicose",
        "well-circumscribed",
        "well-defined",
    ),
    "change": (
        "decrease",
        "decreased",
        "decreasing",
        "enlarging",
        "growing",
        "grown",
        "improved",
        "improving",
        "increase",
        "increased",
        "increasing",
        "larger",
        "new",
        "newly",
        "persistent",
        "progressive",
        "recurrent",
        "residual",
        "resolving",
        "smaller",
        "stable",
        "unchanged",
        "worse",
        "worsened",
        "worsening",
    ),
    "chronicity": ("acute", "chronic", "healed", "healing", "old", "remote", "subacute"),
    "cause": (
        "bacterial",
        "fungal",
        "infectious",
        "inflammatory",
        "postinflammatory",
        "post-inflammatory",
        "post-obstructive",
        "postobstructive",
        "post-operative",
        "postoperative",
        "postsurgical",
        "post-surgical",
        "post-treatment",
        "posttreatment",
        "viral",
    ),
    "count": ("few", "innumerable", "multiple", "numerous", "several", "single", "solitary"),
}
"""MODIFIER words by kind. "resolved" is left out on purpose: it is a negation cue."""

MISSPELLINGS: dict[str, tuple[str, ...]] = {
    "atelectasis": ("atelactasis", "atelectesis", "atelectisis", "ateletasis"),
    "bronchiectasis": ("bronchiactasis", "bronchiectesis"),
    "cardiomegaly": ("cardiomeagly", "cardiomegally"),
    "consolidation": ("consoldation", "consolidaton", "consolodation"),
    "effusion": ("effuson", "effusoin", "effussion", "efusion"),
    "emphysema": ("emphesema", "emphysemia", "emphysyma"),
    "lymphadenopathy": ("lymphadenapathy", "lymphadenopaty", "lymphadenophathy"),
    "mediastinum": ("mediastinium",),
    "nodule": ("nodual",),
    "opacity": ("opacitiy", "opactiy"),
    "opacities": ("opacites", "opacitites"),
    "pericardial": ("pericardal",),
    "pleural": ("plueral", "pleual"),
    "pneumothorax": ("penumothorax", "pneumothorx", "pneumothroax", "pnuemothorax"),
    "spiculated": ("speculated",),
}
"""Frequent misspellings of a word. A word that starts with the key also matches
with the key replaced, so "effussions" matches as the plural of "effusion"."""

_IRREGULAR_PLURALS: dict[str, str] = {
    "bronchus": "bronchi",
    "bulla": "bullae",
    "axilla": "axillae",
    "embolus": "emboli",
    "hilum": "hila",
    "thrombus": "thrombi",
    "vertebra": "vertebrae",
}
"""Latin plurals of single words."""

_IRREGULAR_ENDINGS: tuple[tuple[str, str], ...] = (
    ("thorax", "thoraces"),
    ("apex", "apices"),
    ("sis", "ses"),
)
"""Greek and Latin plural endings ("pneumothoraces", "apices", "metastases")."""

_NUMBER = r"\d+(?:\.\d+)?"
_UNIT = r"(?:mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)"
_TIMES = r"\s*(?:x|×|by)\s*"  # noqa: RUF001  # U+00D7, the multiplication sign

MEASUREMENT_PATTERN = re.compile(
    rf"(?<![\w.])(?:{_NUMBER}(?:\s*{_UNIT})?{_TIMES})*{_NUMBER}(?:\s*|-){_UNIT}(?!\w)",
    re.IGNORECASE,
)
"""A size in mm or cm with one to three dimensions: "9 mm", "1.2 x 0.8 cm", "3-cm"."""


def pluralize(phrase: str) -> str:
    """Return ``phrase`` with its last word in the plural ("lymph node" -> "lymph nodes").

    Latin and Greek plurals come first ("bronchus" -> "bronchi", "bulla" ->
    "bullae", "metastasis" -> "metastases"), then the English rules. A word in
    capitals, such as an abbreviation, takes a plain "s" ("GGO" -> "GGOs").
    """
    head, _, word = phrase.rpartition(" ")
    prefix = f"{head} " if head else ""

    if word.isupper():
        return f"{prefix}{word}s"
    if word in _IRREGULAR_PLURALS:
        return f"{prefix}{_IRREGULAR_PLURALS[word]}"

    for singular_end, plural_end in _IRREGULAR_ENDINGS:
        if word.endswith(singular_end):
            return f"{prefix}{word[: -len(singular_end)]}{plural_end}"

    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return f"{prefix}{word[:-1]}ies"
    if word.endswith(("s", "x", "z", "sh", "ch")):
        return f"{prefix}{word}es"
    return f"{prefix}{word}s"


@dataclass(frozen=True)
class Lexicon:
    """The expanded vocabulary: every spelling the rules backend matches.

    Attributes:
        phrases: label -> phrases, lower case, sorted, with plurals, spaced
            spellings of hyphenated terms and misspellings included.
        laterality: lower-case laterality phrases, a subset of the MODIFIER phrases.
        measurement_pattern: regular expression source for measurements.
    """

    phrases: dict[Label, tuple[str, ...]]
    laterality: frozenset[str]
    measurement_pattern: str

    def label_of(self, phrase: str) -> Label:
        """Return the label of a lexicon phrase, compared in lower case.

        Raises:
            KeyError: the phrase is not in the lexicon.
        """
        lowered = phrase.lower()
        for label, phrases in self.phrases.items():
            if lowered in phrases:
                return label
        raise KeyError(phrase)

    @property
    def digest(self) -> str:
        """SHA-256 hex digest of the phrases, laterality set and measurement pattern."""
        payload = {
            "phrases": {label: list(phrases) for label, phrases in sorted(self.phrases.items())},
            "laterality": sorted(self.laterality),
            "measurement_pattern": self.measurement_pattern,
        }
        encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(encoded).hexdigest()


def _spelling_variants(phrase: str) -> set[str]:
    """Return the phrase, its spaced spelling if hyphenated, and its misspellings."""
    variants = {phrase}
    if "-" in phrase:
        variants.add(phrase.replace("-", " "))

    for variant in list(variants):
        words = variant.split(" ")
        for position, word in enumerate(words):
            for correct, wrong_spellings in MISSPELLINGS.items():
                if not word.startswith(correct):
                    continue
                for wrong in wrong_spellings:
                    replaced = [
                        *words[:position],
                        wrong + word[len(correct) :],
                        *words[position + 1 :],
                    ]
                    variants.add(" ".join(replaced))
    return variants


def _expand(nouns: tuple[str, ...], terms: tuple[str, ...]) -> set[str]:
    """Lower-case every noun with its plural and every term, with spelling variants."""
    base = {noun.lower() for noun in nouns}
    base |= {pluralize(noun).lower() for noun in nouns}
    base |= {term.lower() for term in terms}

    expanded: set[str] = set()
    for phrase in base:
        expanded |= _spelling_variants(phrase)
    return expanded


@lru_cache(maxsize=1)
def build_lexicon() -> Lexicon:
    """Expand the vocabulary of this module into a :class:`Lexicon`.

    Raises:
        ValueError: one phrase ends up under two labels.
    """
    modifier_terms = tuple(term for terms in MODIFIER_TERMS.values() for term in terms)
    by_label: dict[Label, set[str]] = {
        "FINDING": _expand(FINDING_NOUNS, FINDING_TERMS),
        "BODY_PART": _expand(ANATOMY_NOUNS, ANATOMY_TERMS),
        "MODIFIER": _expand((), modifier_terms + LATERALITY),
    }

    for index, label in enumerate(LABELS):
        for other in LABELS[index + 1 :]:
            shared = by_label[label] & by_label[other]
            if shared:
                message = (
                    f"lexicon phrases {sorted(shared)} are listed as both {label} and {other}: "
                    "keep each phrase under one label"
                )
                raise ValueError(message)

    laterality: set[str] = set()
    for term in LATERALITY:
        laterality |= _spelling_variants(term.lower())

    return Lexicon(
        phrases={label: tuple(sorted(by_label[label])) for label in LABELS},
        laterality=frozenset(laterality),
        measurement_pattern=MEASUREMENT_PATTERN.pattern,
    )
