"""Evaluation on held-out phantom prompts: text following and explanation quality.

For each held-out case (seeds from ``EVAL_SEED_OFFSET`` on, never used in
training) the report is generated from a phantom spec, the model samples a volume
from it, and two token-map aggregations are captured in the same run: the full one
(all layers, all steps) and the original Medsyn_XAI one (last middle layer, last
step only). Cases cycle through three kinds:

* located: one drawn lobe or side finding. The lesion channel must lie in the
  stated lobe (most lesion voxels carry that lobe's label in the generated lobe
  channel) or on the stated side (lesion centroid in the right or left half);
  the finding word's heatmap is scored against the generated lesion mask with
  the pointing game, mass in mask and AUROC;
* negated: findings that the report negates; the lesion channel must stay empty;
* normal: a normal report; the lesion channel must stay empty.

"Empty" means fewer than ``clean_fraction`` of the output voxels (default 0.05 %).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import structlog
import torch

from medsyn_xai.config import EVAL_SEED_OFFSET
from medsyn_xai.metrics import auroc, mass_in_mask, pointing_game
from medsyn_xai.model.diffusion import sample
from medsyn_xai.model.volume import decode_volume
from medsyn_xai.phantom import FINDING_KINDS, PhantomSpec, lobe_label, random_spec
from medsyn_xai.phantom.report import Report, write_report
from medsyn_xai.pipeline.generate import StudyGenerator
from medsyn_xai.saliency.capture import ObserverGroup, SaliencyCapture
from medsyn_xai.saliency.resize import resize_maps
from medsyn_xai.text.tokens import TokenRecord

__all__ = [
    "CASE_KINDS",
    "CaseResult",
    "HeldOutCase",
    "evaluate_model",
    "finding_tokens",
    "held_out_case",
    "LOBE_KINDS",
    "SIDE_KINDS",
]

log = structlog.get_logger(__name__)

LOBE_KINDS = ("nodule", "mass", "consolidation", "ground_glass", "atelectasis")
SIDE_KINDS = ("pleural_effusion", "pneumothorax")
EXPLANATION_KEYS = ("pointing_game", "mass_in_mask", "auroc")
CASE_KINDS = ("located", "located", "negated", "normal")
_MAX_REDRAWS = 200


@dataclass
class CaseResult:
    """The outcome of one held-out case."""

    seed: int
    kind: str
    report: str
    finding: str | None = None
    location_correct: bool | None = None
    lesion_clean: bool | None = None
    lesion_voxels: int = 0
    full: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)


def _draw_spec(seed: int, kind: str):
    """Draw a spec of the requested case kind, redrawing with derived seeds."""
    for attempt in range(_MAX_REDRAWS):
        draw_seed = seed * _MAX_REDRAWS + attempt
        if kind == "located":
            spec = random_spec(
                draw_seed, max_findings=1, p_normal=0.0, p_negation=0.0, p_uncertain=0.0,
                kinds=LOBE_KINDS + SIDE_KINDS,
            )
            if spec.findings and spec.findings[0].side != "bilateral":
                return spec
        else:
            spec = random_spec(draw_seed, max_findings=2, p_normal=1.0, kinds=FINDING_KINDS)
            has_findings = bool(spec.findings)
            if (kind == "negated") == has_findings:
                return spec
    raise RuntimeError(f"no {kind} spec found for seed {seed} in {_MAX_REDRAWS} draws")


@dataclass(frozen=True)
class HeldOutCase:
    """One held-out evaluation case: its seed, kind, phantom spec and report."""

    seed: int
    kind: str
    spec: PhantomSpec
    report: Report


def held_out_case(index: int, *, seed: int = 0) -> HeldOutCase:
    """Return held-out case ``index`` of an evaluation that starts at ``seed``.

    Case kinds cycle through :data:`CASE_KINDS`, and the case seed is
    ``EVAL_SEED_OFFSET + seed + index``, so any script can draw the same cases
    as :func:`evaluate_model`.
    """
    case_seed = EVAL_SEED_OFFSET + seed + index
    kind = CASE_KINDS[index % len(CASE_KINDS)]
    spec = _draw_spec(case_seed, kind)
    return HeldOutCase(seed=case_seed, kind=kind, spec=spec, report=write_report(spec, case_seed))


def finding_tokens(case: HeldOutCase, tokens: Sequence[TokenRecord]) -> list[int]:
    """Return the indices of the prompt tokens that overlap the first finding's first mention."""
    mention = case.report.mentions_of(0)[0]
    return [
        record.index
        for record in tokens
        if not record.special and record.start < mention.end and mention.start < record.end
    ]


def _location_correct(finding, lesion: np.ndarray, lobes: np.ndarray) -> bool:
    """Check that a generated lesion lies in the finding's lobe or on its side."""
    if not lesion.any():
        return False
    if finding.kind in LOBE_KINDS:
        labels = lobes[lesion & (lobes > 0)]
        if labels.size == 0:
            return False
        return bool(np.mean(labels == lobe_label(finding.lobe)) > 0.5)  # the lingula counts as LUL
    centroid_x = np.argwhere(lesion)[:, 2].mean()
    on_right = bool(centroid_x < lesion.shape[2] / 2)  # x runs from the patient's right to left
    return on_right == (finding.side == "right")


def _explanation_scores(heatmap: np.ndarray, lesion: np.ndarray) -> dict[str, float]:
    return {
        "pointing_game": float(pointing_game(heatmap, lesion)),
        "mass_in_mask": mass_in_mask(heatmap, lesion),
        "auroc": auroc(heatmap, lesion),
    }


def _mean(values: list[float]) -> float:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_model(
    generator: StudyGenerator,
    *,
    n: int = 24,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    clean_fraction: float = 5e-4,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate the generator's model on ``n`` held-out phantom prompts.

    Args:
        generator: the loaded model, text encoder and settings (output grid).
        n: number of cases; kinds cycle located, located, negated, normal.
        seed: first evaluation seed, offset by ``EVAL_SEED_OFFSET``.
        steps, guidance_scale: sampler overrides; None uses the settings.
        clean_fraction: lesion voxels below this fraction of the volume count as none.
        progress: called with 1 per finished case.

    Returns:
        A dict with ``lesion_location_accuracy``, ``negated_absent_rate``,
        ``normal_clean_rate``, ``pointing_game``, ``mass_in_mask``, ``auroc``,
        ``baseline_last_layer_last_step`` (the three explanation keys), per-finding
        explanation scores under ``per_finding``, one row per case under ``cases``
        (seed, kind, report, finding, location_correct, lesion_clean,
        lesion_voxels and the ``full`` and ``baseline`` scores), case counts and
        settings.
    """
    if n < 1:
        raise ValueError(f"n is {n}: evaluate at least one case")
    sampler = generator.settings.sampler
    steps = steps or sampler.steps
    guidance_scale = guidance_scale or sampler.guidance_scale
    grid = generator.settings.output.grid
    model = generator.model
    factor = generator.loaded.config.downsample_factor
    attention_grid = (generator.native_shape[1] // factor, generator.native_shape[2] // factor)
    last_layer = len(model.cross_attention_layers()) - 1
    min_voxels = clean_fraction * int(np.prod(grid))

    cases: list[CaseResult] = []
    for index in range(n):
        case = held_out_case(index, seed=seed)
        case_seed, kind, spec = case.seed, case.kind, case.spec
        encoded = generator.encode_prompt(case.report.text)

        # 1. One sampling run feeds both aggregations.
        full = SaliencyCapture(model)
        baseline = SaliencyCapture(model, layers=[last_layer], steps=[steps - 1])
        with full, baseline:
            x0 = sample(
                model,
                encoded.embeddings,
                context_mask=encoded.attention_mask,
                shape=generator.native_shape,
                seed=case_seed,
                steps=steps,
                guidance_scale=guidance_scale,
                observer=ObserverGroup(full, baseline),
            )
        _, masks = decode_volume(x0, generator.channel_names, grid)
        lesion = masks["lesion"] > 0
        result = CaseResult(seed=case_seed, kind=kind, report=case.report.text, lesion_voxels=int(lesion.sum()))

        # 2. Text following.
        if kind != "located":
            result.lesion_clean = bool(lesion.sum() < min_voxels)
        else:
            finding = spec.findings[0]
            result.finding = finding.kind
            result.location_correct = _location_correct(finding, lesion, masks["lobes"])

            # 3. Explanation of the finding word against the generated lesion.
            tokens = finding_tokens(case, encoded.tokens)
            if tokens and lesion.any():
                for capture, scores in ((full, result.full), (baseline, result.baseline)):
                    maps = capture.token_maps(*attention_grid)[tokens].mean(dim=0, keepdim=True)
                    heatmap = resize_maps(maps, grid)[0].numpy()
                    scores.update(_explanation_scores(heatmap, lesion))

        cases.append(result)
        log.info(
            "evaluation case",
            seed=case_seed,
            kind=kind,
            finding=result.finding,
            location_correct=result.location_correct,
            lesion_clean=result.lesion_clean,
            lesion_voxels=result.lesion_voxels,
            **{f"full_{key}": value for key, value in result.full.items()},
        )
        if progress is not None:
            progress(1)

    return _summarise(
        cases,
        steps=steps,
        guidance_scale=guidance_scale,
        clean_fraction=clean_fraction,
        hide_negated=generator.negation_masker is not None,
    )


def _summarise(cases: list[CaseResult], **settings) -> dict:
    located = [case for case in cases if case.kind == "located"]
    negated = [case for case in cases if case.kind == "negated"]
    normal = [case for case in cases if case.kind == "normal"]
    explained = [case for case in located if case.full]

    summary = {
        "lesion_location_accuracy": _mean([float(case.location_correct) for case in located]),
        "negated_absent_rate": _mean([float(case.lesion_clean) for case in negated]),
        "normal_clean_rate": _mean([float(case.lesion_clean) for case in normal]),
        **{key: _mean([case.full[key] for case in explained]) for key in EXPLANATION_KEYS},
        "baseline_last_layer_last_step": {
            key: _mean([case.baseline[key] for case in explained]) for key in EXPLANATION_KEYS
        },
        "per_finding": {},
        "counts": {
            "cases": len(cases),
            "located": len(located),
            "explained": len(explained),
            "negated": len(negated),
            "normal": len(normal),
        },
        "settings": settings,
        "cases": [asdict(case) for case in cases],
    }
    for kind in sorted({case.finding for case in explained}):
        of_kind = [case for case in explained if case.finding == kind]
        summary["per_finding"][kind] = {
            "n": len(of_kind),
            "location_accuracy": _mean([float(case.location_correct) for case in of_kind]),
            **{key: _mean([case.full[key] for case in of_kind]) for key in EXPLANATION_KEYS},
            "baseline": {key: _mean([case.baseline[key] for case in of_kind]) for key in EXPLANATION_KEYS},
        }
    return summary
