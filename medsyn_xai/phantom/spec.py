"""Structured description of one synthetic chest CT: its findings and its anatomy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = [
    "ASSERTIONS",
    "EXTENTS",
    "FINDING_KINDS",
    "FINDING_LOBES",
    "LOBES",
    "LOBE_LABELS",
    "LOBE_SIDES",
    "MASS_MIN_MM",
    "SHORT_AXIS_RATIO",
    "SIDES",
    "SIZES",
    "ZONES",
    "AnatomyParams",
    "Finding",
    "PhantomSpec",
    "lobe_label",
    "random_spec",
    "sample_anatomy",
]

LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")
LOBE_LABELS = {"RUL": 1, "RML": 2, "RLL": 3, "LUL": 4, "LLL": 5}

# The lingula is part of the left upper lobe (label 4), but a finding may name
# it, and is then drawn in the lingula's anterior-inferior part of that lobe.
FINDING_LOBES = LOBES + ("lingula",)
LOBE_SIDES = {
    "RUL": "right",
    "RML": "right",
    "RLL": "right",
    "LUL": "left",
    "LLL": "left",
    "lingula": "left",
}

FINDING_KINDS = (
    "nodule",
    "mass",
    "consolidation",
    "ground_glass",
    "atelectasis",
    "pleural_effusion",
    "pneumothorax",
    "emphysema",
    "cardiomegaly",
    "pericardial_effusion",
)
ASSERTIONS = ("present", "absent", "uncertain")
SIDES = ("right", "left", "bilateral")
SIZES = ("small", "moderate", "large")
EXTENTS = ("mild", "moderate", "severe")
ZONES = ("upper", "lower", "diffuse")

# Radiology calls a focal lung lesion over 30 mm a mass and one up to 30 mm a nodule.
MASS_MIN_MM = 30.0

# Short-to-long diameter ratio of drawn nodules and masses, so that a report's
# "12 x 10 mm" matches the drawn lesion's axial diameters.
SHORT_AXIS_RATIO = {"nodule": 0.85, "mass": 0.8}

# Fields each kind accepts, and those it needs when drawn (present or uncertain).
_ACCEPTED_FIELDS = {
    "nodule": ("lobe", "size_mm"),
    "mass": ("lobe", "size_mm"),
    "consolidation": ("lobe",),
    "ground_glass": ("lobe",),
    "atelectasis": ("lobe",),
    "pleural_effusion": ("side", "size"),
    "pneumothorax": ("side", "size"),
    "emphysema": ("extent", "zone"),
    "cardiomegaly": (),
    "pericardial_effusion": ("size",),
}
_REQUIRED_FIELDS = {
    "nodule": ("lobe", "size_mm"),
    "mass": ("lobe", "size_mm"),
    "consolidation": ("lobe",),
    "ground_glass": ("lobe",),
    "atelectasis": ("lobe",),
    "pleural_effusion": ("side", "size"),
    "pneumothorax": ("side",),
    "emphysema": ("extent", "zone"),
    "cardiomegaly": (),
    "pericardial_effusion": (),
}
_OPTIONAL_FIELDS = ("lobe", "side", "size_mm", "size", "extent", "zone")


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(value) for value in values)


def lobe_label(lobe: str) -> int:
    """Return the label (1-5) in ``masks["lobes"]`` of a lobe name. The lingula maps to LUL's 4."""
    if lobe == "lingula":
        return LOBE_LABELS["LUL"]
    if lobe not in LOBE_LABELS:
        message = f"unknown lobe {lobe!r}; use one of {_choices(FINDING_LOBES)}"
        raise ValueError(message)
    return LOBE_LABELS[lobe]


@dataclass(frozen=True)
class Finding:
    """One finding of a study, as a report would state it.

    Attributes:
        kind: one of :data:`FINDING_KINDS`.
        lobe: one of :data:`FINDING_LOBES` for nodule, mass, consolidation,
            ground_glass and atelectasis.
        side: "right" or "left" for pneumothorax, and also "bilateral" for
            pleural_effusion.
        size_mm: longest axial diameter in mm, at most 30 for a nodule and over 30 for a mass.
        size: "small", "moderate" or "large" for pleural_effusion, pneumothorax and
            pericardial_effusion.
        extent: "mild", "moderate" or "severe" for emphysema.
        zone: "upper", "lower" or "diffuse" for emphysema.
        assertion: "present", "absent" (negated in the report, not drawn) or
            "uncertain" (hedged in the report, drawn like a present finding).

    Drawn findings need their location and size fields. An absent finding may
    leave them None ("No pleural effusion.") or give them ("No nodule in the RUL.").
    Invalid values raise ValueError.
    """

    kind: str
    lobe: str | None = None
    side: str | None = None
    size_mm: float | None = None
    size: str | None = None
    extent: str | None = None
    zone: str | None = None
    assertion: str = "present"

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            message = f"unknown finding kind {self.kind!r}; use one of {_choices(FINDING_KINDS)}"
            raise ValueError(message)
        if self.assertion not in ASSERTIONS:
            message = f"unknown assertion {self.assertion!r}; use one of {_choices(ASSERTIONS)}"
            raise ValueError(message)

        accepted = _ACCEPTED_FIELDS[self.kind]
        for name in _OPTIONAL_FIELDS:
            if getattr(self, name) is not None and name not in accepted:
                allowed = ", ".join(accepted) or "no location or size fields"
                message = f"{self.kind} does not take {name}={getattr(self, name)!r}; it takes {allowed}"
                raise ValueError(message)
        if self.drawn:
            for name in _REQUIRED_FIELDS[self.kind]:
                if getattr(self, name) is None:
                    message = f"a {self.assertion} {self.kind} needs {name}; pass {name}=... or assertion='absent'"
                    raise ValueError(message)

        self._check_values()

    def _check_values(self) -> None:
        if self.lobe is not None:
            lobe_label(self.lobe)
        if self.side is not None:
            sides = SIDES if self.kind == "pleural_effusion" else SIDES[:2]
            if self.side not in sides:
                message = f"invalid side {self.side!r} for {self.kind}; use one of {_choices(sides)}"
                raise ValueError(message)
        if self.size is not None and self.size not in SIZES:
            message = f"invalid size {self.size!r}; use one of {_choices(SIZES)}"
            raise ValueError(message)
        if self.extent is not None and self.extent not in EXTENTS:
            message = f"invalid extent {self.extent!r}; use one of {_choices(EXTENTS)}"
            raise ValueError(message)
        if self.zone is not None and self.zone not in ZONES:
            message = f"invalid zone {self.zone!r}; use one of {_choices(ZONES)}"
            raise ValueError(message)
        if self.size_mm is not None:
            self._check_size_mm()

    def _check_size_mm(self) -> None:
        size_mm = self.size_mm
        if isinstance(size_mm, bool) or not isinstance(size_mm, (int, float)):
            message = f"size_mm must be a number of millimetres, got {size_mm!r}"
            raise ValueError(message)
        if not math.isfinite(size_mm) or size_mm <= 0:
            message = f"size_mm must be a positive diameter in mm, got {size_mm!r}"
            raise ValueError(message)
        if self.kind == "nodule" and size_mm > MASS_MIN_MM:
            message = f"a nodule is at most {MASS_MIN_MM:g} mm, got size_mm={size_mm!r}; use kind='mass'"
            raise ValueError(message)
        if self.kind == "mass" and size_mm <= MASS_MIN_MM:
            message = f"a mass is over {MASS_MIN_MM:g} mm, got size_mm={size_mm!r}; use kind='nodule'"
            raise ValueError(message)

    @property
    def drawn(self) -> bool:
        """True when the phantom contains this finding (assertion present or uncertain)."""
        return self.assertion != "absent"

    @property
    def body_side(self) -> str | None:
        """Side of the body ("right", "left" or "bilateral") from ``side`` or ``lobe``, or None for midline findings."""
        if self.side is not None:
            return self.side
        if self.lobe is not None:
            return LOBE_SIDES[self.lobe]
        return None

    def to_dict(self) -> dict[str, str | float | None]:
        """Return the finding as a JSON-ready dict with one key per field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Finding:
        """Build a finding from :meth:`to_dict` output, reading missing optional keys as None."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            message = f"unknown finding field {unknown[0]!r}; use only {', '.join(sorted(known))}"
            raise ValueError(message)
        if "kind" not in data:
            message = "finding dict has no 'kind'; add one of " + _choices(FINDING_KINDS)
            raise ValueError(message)
        return cls(**data)


@dataclass(frozen=True)
class AnatomyParams:
    """Scale factors for one patient's build, where 1.0 is the average phantom.

    Attributes:
        body_width: left-right body and rib cage size, 0.88 to 1.12.
        body_depth: anterior-posterior body and rib cage size, 0.88 to 1.12.
        lung_height: craniocaudal lung size, 0.92 to 1.05.
        heart_size: heart size before any cardiomegaly, 0.88 to 1.12.
        fat_mm: subcutaneous fat thickness in mm, 5 to 24.
    """

    body_width: float = 1.0
    body_depth: float = 1.0
    lung_height: float = 1.0
    heart_size: float = 1.0
    fat_mm: float = 14.0

    def __post_init__(self) -> None:
        bounds = {
            "body_width": (0.88, 1.12),
            "body_depth": (0.88, 1.12),
            "lung_height": (0.92, 1.05),
            "heart_size": (0.88, 1.12),
            "fat_mm": (5.0, 24.0),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                message = f"AnatomyParams.{name} must be between {low:g} and {high:g}, got {value!r}"
                raise ValueError(message)

    def to_dict(self) -> dict[str, float]:
        """Return the parameters as a JSON-ready dict."""
        return asdict(self)


def sample_anatomy(rng: np.random.Generator) -> AnatomyParams:
    """Draw mild per-patient variation of body, lung and heart size."""
    return AnatomyParams(
        body_width=float(rng.uniform(0.9, 1.1)),
        body_depth=float(rng.uniform(0.9, 1.1)),
        lung_height=float(rng.uniform(0.94, 1.04)),
        heart_size=float(rng.uniform(0.9, 1.1)),
        fat_mm=float(rng.uniform(7.0, 22.0)),
    )


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines one phantom and its report.

    Attributes:
        seed: non-negative int. The phantom's anatomy, noise and lesion placement
            follow from it, so the same spec always gives the same arrays.
        findings: the study's findings, in report order. A list is stored as a tuple.
        anatomy: body, lung and heart size, or None to draw mild variation from ``seed``.
    """

    seed: int
    findings: tuple[Finding, ...] = ()
    anatomy: AnatomyParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            message = f"seed must be a non-negative int, got {self.seed!r}"
            raise ValueError(message)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "findings", tuple(self.findings))
        for finding in self.findings:
            if not isinstance(finding, Finding):
                kind = type(finding).__name__
                message = f"findings must contain Finding objects, got {kind}; build them with Finding(...)"
                raise TypeError(message)
        if self.anatomy is not None and not isinstance(self.anatomy, AnatomyParams):
            message = f"anatomy must be AnatomyParams or None, got {type(self.anatomy).__name__}"
            raise TypeError(message)

    @property
    def is_normal(self) -> bool:
        """True when no finding is drawn, so the lesion mask is empty."""
        return not any(finding.drawn for finding in self.findings)

    def to_dict(self) -> dict:
        """Return the spec as a JSON-ready dict with keys seed, findings and anatomy."""
        return {
            "seed": self.seed,
            "findings": [finding.to_dict() for finding in self.findings],
            "anatomy": None if self.anatomy is None else self.anatomy.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PhantomSpec:
        """Build a spec from :meth:`to_dict` output."""
        if "seed" not in data:
            message = "spec dict has no 'seed'; add a non-negative int seed"
            raise ValueError(message)
        anatomy = data.get("anatomy")
        return cls(
            seed=data["seed"],
            findings=tuple(Finding.from_dict(item) for item in data.get("findings", ())),
            anatomy=None if anatomy is None else AnatomyParams(**anatomy),
        )


def _random_lobe(rng: np.random.Generator) -> str:
    weights = np.array([0.2, 0.12, 0.22, 0.16, 0.2, 0.1])
    return str(rng.choice(FINDING_LOBES, p=weights))


def _random_finding(kind: str, assertion: str, rng: np.random.Generator) -> Finding:
    if assertion == "absent" and rng.random() > 0.3:
        return Finding(kind, assertion=assertion)

    values: dict[str, str | float] = {}
    if kind in ("nodule", "mass", "consolidation", "ground_glass", "atelectasis"):
        values["lobe"] = _random_lobe(rng)
    if kind == "nodule":
        values["size_mm"] = float(rng.integers(4, 29))
    if kind == "mass":
        values["size_mm"] = float(rng.integers(32, 71))
    if kind == "pleural_effusion":
        values["side"] = str(rng.choice(SIDES, p=[0.4, 0.35, 0.25]))
        values["size"] = str(rng.choice(SIZES, p=[0.5, 0.35, 0.15]))
    if kind == "pneumothorax":
        values["side"] = str(rng.choice(SIDES[:2]))
        if rng.random() < 0.7:
            values["size"] = str(rng.choice(SIZES, p=[0.6, 0.3, 0.1]))
    if kind == "emphysema":
        values["extent"] = str(rng.choice(EXTENTS))
        values["zone"] = str(rng.choice(ZONES, p=[0.5, 0.2, 0.3]))
    if kind == "pericardial_effusion" and rng.random() < 0.7:
        values["size"] = str(rng.choice(SIZES, p=[0.6, 0.3, 0.1]))
    if assertion == "absent":
        # An absent finding keeps only its location ("No left pleural effusion.").
        values = {name: value for name, value in values.items() if name in ("lobe", "side")}
    return Finding(kind, assertion=assertion, **values)


def random_spec(
    seed: int,
    *,
    max_findings: int = 3,
    p_normal: float = 0.15,
    p_negation: float = 0.3,
    p_uncertain: float = 0.15,
    kinds: tuple[str, ...] | None = None,
) -> PhantomSpec:
    """Draw a varied study for training: normal, single or multiple findings, some negated or hedged.

    Args:
        seed: non-negative int. The same arguments always give the same spec,
            and the spec's own ``seed`` is this value.
        max_findings: maximum number of findings per study, counting negated ones. Default 3.
        p_normal: chance of a normal study, whose findings (zero up to
            ``max_findings``) are all negated. Default 0.15.
        p_negation: chance that each finding of an abnormal study is negated
            ("absent"). The first is always drawn. Default 0.3.
        p_uncertain: chance that a drawn finding is hedged ("uncertain"). Default 0.15.
        kinds: finding kinds to draw from, or None (default) for all of :data:`FINDING_KINDS`.

    Each kind appears at most once per study, so a negation never contradicts a
    drawn finding. ``anatomy`` is left None, so the anatomy varies with the seed.
    """
    if kinds is None:
        kinds = FINDING_KINDS
    for kind in kinds:
        if kind not in FINDING_KINDS:
            message = f"unknown finding kind {kind!r} in kinds; use values from {_choices(FINDING_KINDS)}"
            raise ValueError(message)
    if len(kinds) == 0:
        message = "kinds is empty; pass at least one finding kind or None for all"
        raise ValueError(message)
    if max_findings < 1:
        message = f"max_findings must be at least 1, got {max_findings!r}"
        raise ValueError(message)
    for name, probability in (("p_normal", p_normal), ("p_negation", p_negation), ("p_uncertain", p_uncertain)):
        if not 0.0 <= probability <= 1.0:
            message = f"{name} must be a probability in [0, 1], got {probability!r}"
            raise ValueError(message)

    rng = np.random.default_rng(seed)
    limit = min(max_findings, len(kinds))
    normal = rng.random() < p_normal
    count = int(rng.integers(0 if normal else 1, limit + 1))
    chosen = [str(kind) for kind in rng.permutation(np.array(kinds))[:count]]

    findings = []
    for index, kind in enumerate(chosen):
        if normal or (index > 0 and rng.random() < p_negation):
            assertion = "absent"
        elif rng.random() < p_uncertain:
            assertion = "uncertain"
        else:
            assertion = "present"
        findings.append(_random_finding(kind, assertion, rng))
    return PhantomSpec(seed=int(seed), findings=tuple(findings))
