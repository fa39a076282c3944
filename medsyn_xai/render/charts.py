"""The per-token saliency chart: how much attention each token position gets inside the body."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from medsyn_xai.render.figures import literal, new_figure, png_bytes
from medsyn_xai.render.maps import BODY_HU, entities_of
from medsyn_xai.store import StudyStore

__all__ = ["LABEL_COLOURS", "TOKEN_CHART_DPI", "TOKEN_CHART_SIZE_PX", "TokenMass", "render_token_chart", "token_mass"]

log = structlog.get_logger(__name__)

TOKEN_CHART_SIZE_PX = (1500, 600)
"""Width and height in pixels of the token chart PNG."""

TOKEN_CHART_DPI = 100

LABEL_COLOURS = {"FINDING": "#d62728", "BODY_PART": "#1f77b4", "MODIFIER": "#2ca02c"}
"""Colour of each entity label, shared by the chart and the HTML report."""

_OTHER_COLOUR = "#8c8c8c"
_SPECIAL_COLOUR = "#d9d9d9"
_LABEL_ORDER = ("FINDING", "BODY_PART", "MODIFIER")


@dataclass(frozen=True)
class TokenMass:
    """Saliency per token position inside the body.

    Attributes:
        mass: float64 (T,) mean attention probability of each token over body
            voxels. It sums to 1 when every voxel's token maps sum to 1.
        body_voxels: CT voxels with HU above ``BODY_HU`` (-500).
        whole_volume: True when the body mask was empty and every voxel was used.
    """

    mass: np.ndarray
    body_voxels: int
    whole_volume: bool


def token_mass(store: StudyStore) -> TokenMass:
    """Average each token map over the body.

    1. Body mask on the CT grid: CT > -500 HU, as float (Z, Y, X).

    2. Resize it to the saliency grid (d, h, w) by area averaging, so each coarse
       voxel is weighted by the share of its volume inside the body.

    3. Weighted mean of each token map: sum(weight * map) / sum(weight).

    Returns:
        A :class:`TokenMass` with one value per token position (T,).
    """
    import torch
    import torch.nn.functional as F

    saliency = store.saliency().astype(np.float64)  # (T, d, h, w)
    body = store.ct > BODY_HU  # (Z, Y, X)
    body_voxels = int(body.sum())
    whole_volume = body_voxels == 0
    if whole_volume:
        body = np.ones(body.shape, dtype=bool)
    weights = F.adaptive_avg_pool3d(
        torch.from_numpy(body.astype(np.float32))[None, None], saliency.shape[1:]  # (1, 1, Z, Y, X)
    )[0, 0].numpy().astype(np.float64)  # (d, h, w)
    mass = np.einsum("tdhw,dhw->t", saliency, weights) / weights.sum()
    return TokenMass(mass=mass, body_voxels=body_voxels, whole_volume=whole_volume)


def _token_labels(store: StudyStore) -> tuple[dict[int, str], set[int]]:
    """Map token position -> label of the entity it belongs to, and the positions inside absent entities.

    FINDING wins over BODY_PART over MODIFIER when entities share a token.
    """
    labels: dict[int, str] = {}
    negated: set[int] = set()
    for entity in entities_of(store):
        label = str(entity.get("label", ""))
        if label not in LABEL_COLOURS:
            continue
        for index in entity.get("token_indices", []):
            current = labels.get(int(index))
            if current is None or _LABEL_ORDER.index(label) < _LABEL_ORDER.index(current):
                labels[int(index)] = label
            if entity.get("assertion") == "absent":
                negated.add(int(index))
    return labels, negated


def render_token_chart(store: StudyStore) -> bytes:
    """Return a 1500 x 600 pixel PNG bar chart of saliency per token position inside the body.

    Bar heights are mean attention probabilities over body voxels (CT > -500 HU,
    see :func:`token_mass`). The wide left panel shows the prompt tokens in
    sequence order, coloured by the label of the entity they belong to (grey when
    none). Tokens of an absent (negated) entity are cross-hatched in white. The
    narrow right panel, with its own y scale, shows the special tokens ([CLS],
    [SEP], [PAD], ...) apart, light grey and hatched: one bar per distinct token
    text holding the summed mass of all its positions (tick label "[PAD] ×150").
    """
    tokens = store.tokens
    figure = new_figure(TOKEN_CHART_SIZE_PX, TOKEN_CHART_DPI)
    ax = figure.add_axes((0.08, 0.27, 0.72, 0.60))
    special_ax = figure.add_axes((0.84, 0.27, 0.14, 0.60))
    ax.set_ylabel("mean attention probability\nover body voxels")

    # 1. Compute the mass per position. Prompt tokens keep their order and special tokens are grouped by text.
    result = token_mass(store) if tokens else None
    labels, negated = _token_labels(store)
    prompt_positions = [int(token["index"]) for token in tokens if not token["special"]]
    groups: dict[str, list[int]] = {}
    for token in tokens:
        if token["special"]:
            groups.setdefault(str(token["text"]), []).append(int(token["index"]))

    # 2. Prompt tokens, one bar per position.
    if result is not None and prompt_positions:
        heights = [float(result.mass[index]) for index in prompt_positions]
        colours = [LABEL_COLOURS.get(labels.get(index, ""), _OTHER_COLOUR) for index in prompt_positions]
        bars = ax.bar(range(len(prompt_positions)), heights, color=colours, width=0.8)
        for bar, index in zip(bars, prompt_positions):
            if index in negated:
                bar.set_hatch("xx")
                bar.set_edgecolor("white")
        fontsize = float(np.clip(700 / len(prompt_positions), 5, 10))
        ax.set_xticks(range(len(prompt_positions)))
        tick_texts = [literal(str(tokens[index]["text"])) for index in prompt_positions]
        ax.set_xticklabels(tick_texts, rotation=90, fontsize=fontsize)
        ax.set_xlim(-0.8, len(prompt_positions) - 0.2)
        ax.set_ylim(0, max(heights) * 1.3 if max(heights) > 0 else 1.0)
    else:
        _say(ax, "no prompt tokens")

    # 3. Special tokens apart, summed per token text.
    if result is not None and groups:
        special_heights = [float(result.mass[members].sum()) for members in groups.values()]
        special_ax.bar(
            range(len(groups)), special_heights, color=_SPECIAL_COLOUR, edgecolor="#606060", hatch="//", width=0.7
        )
        special_ax.set_xticks(range(len(groups)))
        special_ax.set_xticklabels(
            [literal(text if len(members) == 1 else f"{text} ×{len(members)}") for text, members in groups.items()],
            rotation=90, fontsize=9,
        )
        special_ax.set_ylim(0, max(special_heights) * 1.15 if max(special_heights) > 0 else 1.0)
    else:
        _say(special_ax, "no special tokens")
    special_ax.set_title("special / padding\n(sum over positions)", fontsize=10)

    # 4. Legend and title.
    legend = [Patch(color=colour, label=label) for label, colour in LABEL_COLOURS.items()]
    legend += [
        Patch(facecolor=_OTHER_COLOUR, edgecolor="white", hatch="xx", label="token of an absent entity"),
        Patch(color=_OTHER_COLOUR, label="other prompt token"),
    ]
    ax.legend(handles=legend, loc="upper right", fontsize=9, ncols=5)
    if result is None:
        region = "no tokens in this study"
    elif result.whole_volume:
        region = f"whole volume, no voxel above {BODY_HU:g} HU; all bars sum to {result.mass.sum():.2f}"
    else:
        region = f"body = CT > {BODY_HU:g} HU, {result.body_voxels} voxels; all bars sum to {result.mass.sum():.2f}"
    figure.text(0.5, 0.95, literal(f"Saliency per token inside the body: study {store.study_id} ({region})"),
                ha="center", va="center", fontsize=12)
    log.debug("token_chart_rendered", study_id=store.study_id, n_tokens=len(tokens), n_special_groups=len(groups))
    return png_bytes(figure)


def _say(ax: Axes, text: str) -> None:
    """Write ``text`` in the middle of an empty panel and hide its ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#606060")
    ax.set_xticks([])
    ax.set_yticks([])
