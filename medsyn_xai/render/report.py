"""One self-contained HTML report of a study: prompt, entity overlays, slice viewer, token chart, provenance.

The report loads nothing from outside itself: images are PNG data URIs, style and
script are inline, and a Content-Security-Policy forbids every other source, so
the file opens from disk with no server and no network.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import structlog

from medsyn_xai.render.charts import LABEL_COLOURS, render_token_chart
from medsyn_xai.render.maps import (
    TOP_FRACTION,
    check_window,
    entities_of,
    entity_heatmap,
    format_slice_ranges,
    joint_overlap,
)
from medsyn_xai.render.overlays import draw_triplanar, entity_status, entity_title
from medsyn_xai.render.slices import axial_slice_png
from medsyn_xai.store import StudyStore

__all__ = ["REPORT_SLICES", "SLICE_SIZE_PX", "build_report", "slice_positions"]

log = structlog.get_logger(__name__)

REPORT_SLICES = 16
"""Maximum number of axial slices per entity in the report's slider."""

SLICE_SIZE_PX = 320
"""Longer side in pixels of each axial slice image of the slider."""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def slice_positions(depth: int, peak: int, count: int = REPORT_SLICES) -> tuple[list[int], int]:
    """Pick up to ``count`` evenly spread axial slice indices out of ``depth`` slices, including ``peak``.

    Returns:
        The ascending slice indices z and the position of ``peak`` in that list.
    """
    if count < 1:
        raise ValueError(f"invalid slice count {count!r}: pass at least 1")
    chosen = set(np.linspace(0, depth - 1, min(depth, count)).round().astype(int).tolist())
    if peak not in chosen:
        chosen.remove(min(chosen, key=lambda z: (abs(z - peak), z)))
        chosen.add(peak)
    ordered = sorted(chosen)
    return ordered, ordered.index(peak)


def build_report(store: StudyStore, *, window: str = "lung", n_slices: int = REPORT_SLICES) -> str:
    """Build the study's HTML report as one string.

    The page shows, from top to bottom:

    - the prompt, each entity span highlighted by label colour and assertion
      (strike-through for absent, dotted underline for uncertain);
    - a viewer with the clicked entity's tri-planar overlay and a slider over up
      to ``n_slices`` axial slices of CT and heatmap, then a table of entities;
    - the joint overlaps (Dice of top-10 % voxel sets, shared axial slices) of
      every FINDING x BODY_PART pair;
    - the token chart and the provenance attributes.

    A study without entities gets a report that states this.

    NOTE: the page embeds one 1500 x 520 overlay and up to ``n_slices`` slice
    images per entity, so it grows with the number of entities. The test
    volumes (32^3 to 64^3 voxels) took roughly 0.1 to 0.5 MB per entity, an
    estimate that depends on the volume's texture.

    Args:
        store: an open study.
        window: CT window of every image, "lung" or "mediastinum". Default: "lung".
        n_slices: most axial slices per entity in the slider. Default: 16.

    Returns:
        HTML text (UTF-8) whose images are embedded as base64 PNG data URIs.
    """
    check_window(window)
    entities = entities_of(store)
    ct = store.ct
    heatmaps_stored = store.entity_heatmaps if entities else None
    heatmaps = [entity_heatmap(store, index, heatmaps=heatmaps_stored) for index in range(len(entities))]

    # 1. Per entity: the tri-planar overlay and the axial slices of the slider.
    viewer_data = []
    for index, (entity, heatmap) in enumerate(zip(entities, heatmaps)):
        assertion = str(entity.get("assertion", "present"))
        triplanar = draw_triplanar(
            ct, heatmap, store.spacing_mm, window=window, title=entity_title(store, entity),
            status=entity_status(entity, store.attrs.get("hidden_tokens") or ()), absent=assertion == "absent",
        )
        positions, start = slice_positions(ct.shape[0], triplanar.voxel[0], n_slices)
        slices = [
            _data_uri(
                axial_slice_png(
                    ct, heatmap, store.spacing_mm, z, window=window, absent=assertion == "absent", size_px=SLICE_SIZE_PX
                )
            )
            for z in positions
        ]
        viewer_data.append({
            "text": str(entity.get("text", "")),
            "label": str(entity.get("label", "")),
            "assertion": assertion,
            "overlay": _data_uri(triplanar.png),
            "voxel": list(triplanar.voxel),
            "z": positions,
            "start": start,
            "slices": slices,
        })
        log.debug("report_entity_rendered", study_id=store.study_id, entity=index, n_slices=len(slices))

    # 2. Joint overlaps of every FINDING x BODY_PART pair.
    pairs = []
    for first, entity_a in enumerate(entities):
        for second, entity_b in enumerate(entities):
            if entity_a.get("label") == "FINDING" and entity_b.get("label") == "BODY_PART":
                overlap = joint_overlap(heatmaps[first], heatmaps[second])
                pairs.append((entity_a, entity_b, overlap))

    # 3. Assemble the page.
    data = {"depth": int(ct.shape[0]), "entities": viewer_data}
    body = [
        f"<h1>medsyn-xai report: study {_text(store.study_id)}</h1>",
        _prompt_section(store.prompt, entities),
        _viewer_section(store, entities, viewer_data, window),
        _pairs_section(pairs, bool(entities)),
        "<section><h2>Saliency per token</h2>"
        f'<img id="token-chart" class="wide" alt="bar chart of saliency per token inside the body" '
        f'src="{_data_uri(render_token_chart(store))}"></section>',
        _provenance_section(store),
    ]
    log.info("report_built", study_id=store.study_id, n_entities=len(entities), n_pairs=len(pairs))
    return _PAGE.format(
        csp=_CSP,
        title=_text(f"medsyn-xai report {store.study_id}"),
        style=_style(),
        body="\n".join(body),
        data=_script_json(data),
        script=_SCRIPT,
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' become unicode escapes."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _entity_classes(entity: dict[str, Any]) -> str:
    label = str(entity.get("label", "")) if entity.get("label") in LABEL_COLOURS else "OTHER"
    assertion = str(entity.get("assertion", "present"))
    return f"ent label-{label} assert-{assertion if assertion in ('present', 'absent', 'uncertain') else 'present'}"


def _entity_tooltip(entity: dict[str, Any]) -> str:
    return f"{entity.get('label', '?')}, {entity.get('assertion', '?')}: click to show its heatmap"


def _prompt_section(prompt: str, entities: Sequence[dict[str, Any]]) -> str:
    """Cut the prompt at every entity boundary and wrap each covered piece in its innermost entity."""
    spans = []
    for index, entity in enumerate(entities):
        start, end = int(entity.get("start", 0)), int(entity.get("end", 0))
        if 0 <= start < end <= len(prompt):
            spans.append((start, end, index))
    cuts = sorted({0, len(prompt), *(start for start, _, _ in spans), *(end for _, end, _ in spans)})
    pieces = []
    for left, right in pairwise(cuts):
        covering = [(end - start, index) for start, end, index in spans if start <= left and right <= end]
        segment = _text(prompt[left:right])
        if not covering:
            pieces.append(segment)
            continue
        _, index = min(covering)
        entity = entities[index]
        pieces.append(
            f'<span class="{_entity_classes(entity)}" data-entity="{index}" role="button" tabindex="0" '
            f'title="{_text(_entity_tooltip(entity))}">{segment}</span>'
        )
    legend = " ".join(
        f'<span class="ent label-{label} assert-present">{label}</span>' for label in LABEL_COLOURS
    )
    legend += (
        ' <span class="ent label-OTHER assert-absent">absent (negated)</span>'
        ' <span class="ent label-OTHER assert-uncertain">uncertain</span>'
    )
    return (
        '<section><h2>Prompt</h2>'
        f'<p id="prompt" class="prompt">{"".join(pieces)}</p>'
        f'<p class="legend">Legend: {legend}</p></section>'
    )


def _viewer_section(
    store: StudyStore, entities: Sequence[dict[str, Any]], viewer_data: Sequence[dict[str, Any]], window: str
) -> str:
    if not entities:
        reason = (
            "the NER step found no entities in the prompt"
            if store.has_entities
            else "the NER step has not run on this study: run 'medsyn-xai explain' on the store"
        )
        return f'<section><h2>Entities</h2><p id="no-entities">No entities: {_text(reason)}.</p></section>'
    rows = []
    for index, (entity, shown) in enumerate(zip(entities, viewer_data)):
        covered = "no" if entity.get("covered") is False else "yes"
        rows.append(
            "<tr>"
            f'<td>{index}</td><td><button type="button" class="{_entity_classes(entity)}" data-entity="{index}">'
            f'{_text(shown["text"])}</button></td>'
            f"<td>{_text(shown['label'])}</td><td>{_text(shown['assertion'])}</td><td>{covered}</td>"
            f"<td>{_text(', '.join(str(value) for value in entity.get('token_indices', [])))}</td>"
            f"<td>({', '.join(str(value) for value in shown['voxel'])})</td>"
            "</tr>"
        )
    return f"""<section id="viewer"><h2>Entity heatmap</h2>
<p>Click an entity in the prompt or the table. Window: {_text(window)}. Patient's right is on the image's left.</p>
<h3 id="entity-heading"></h3>
<img id="overlay" class="wide" alt="tri-planar heatmap of the selected entity">
<div class="slicer">
  <div class="frame">
    <span class="edge top">A</span><span class="edge left">R</span>
    <img id="slice-image" alt="axial slice of the selected entity">
    <span class="edge right">L</span><span class="edge bottom">P</span>
  </div>
  <label for="slice-slider">Axial slice</label>
  <input type="range" id="slice-slider" min="0" max="0" step="1" value="0">
  <output id="slice-label" for="slice-slider"></output>
</div>
<table id="entity-table"><thead><tr><th>#</th><th>entity</th><th>label</th><th>assertion</th><th>covered</th>
<th>token positions</th><th>peak voxel (z, y, x)</th></tr></thead><tbody>
{"".join(rows)}
</tbody></table></section>"""


def _pairs_section(pairs: Sequence[tuple[dict[str, Any], dict[str, Any], Any]], has_entities: bool) -> str:
    percent = f"{TOP_FRACTION * 100:g} %"
    heading = f"<h2>Joint overlaps: FINDING x BODY_PART (Dice of top-{percent} voxel sets)</h2>"
    if not pairs:
        reason = "no FINDING x BODY_PART pairs in this study" if has_entities else "no entities"
        return f'<section>{heading}<p id="no-pairs">{reason}.</p></section>'
    rows = [
        "<tr>"
        f"<td>{_text(finding.get('text', ''))} <small>({_text(finding.get('assertion', ''))})</small></td>"
        f"<td>{_text(part.get('text', ''))} <small>({_text(part.get('assertion', ''))})</small></td>"
        f'<td class="number">{overlap.dice:.3f}</td><td>{_text(format_slice_ranges(overlap.slices))}</td>'
        f'<td class="number">{overlap.n_both}</td>'
        "</tr>"
        for finding, part, overlap in pairs
    ]
    return (
        f'<section>{heading}<table id="pair-table"><thead><tr><th>finding</th><th>body part</th>'
        f"<th>Dice</th><th>shared axial slices</th><th>voxels in both</th></tr></thead><tbody>"
        f'{"".join(rows)}</tbody></table></section>'
    )


def _provenance_section(store: StudyStore) -> str:
    attrs = store.attrs
    model = attrs.get("model") if isinstance(attrs.get("model"), dict) else {}
    rows: list[tuple[str, Any]] = [
        ("study id", store.study_id),
        ("model", model.get("name")),
        ("checkpoint sha256", model.get("checkpoint_sha256")),
        ("model details", model),
        ("seed", attrs.get("seed")),
        ("sampler", attrs.get("sampler")),
        ("text encoder", attrs.get("text_encoder")),
        ("software version", attrs.get("software_version")),
        ("created at", attrs.get("created_at")),
        ("spacing (z, y, x) mm", list(store.spacing_mm)),
    ]
    if store.has_entities:
        entity_attrs = store.entity_attrs
        rows.append(("NER backend", f"{entity_attrs.get('backend', '')} {entity_attrs.get('backend_version', '')}"))
    cells = "".join(
        f"<tr><th>{_text(name)}</th><td><code>{_text(_attr_text(value))}</code></td></tr>" for name, value in rows
    )
    return f'<section><h2>Provenance</h2><table id="provenance">{cells}</table></section>'


def _attr_text(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _style() -> str:
    colours = "\n".join(
        f".label-{label} {{ background: {colour}2e; border-bottom: 2px solid {colour}; }}"
        for label, colour in LABEL_COLOURS.items()
    )
    return _STYLE + colours


_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1540px; padding: 0 1em; color: #202020; }
section { margin-bottom: 2em; }
.prompt { font-size: 1.2em; line-height: 1.9; }
.ent { padding: 0 2px; border-radius: 3px; cursor: pointer; font: inherit; }
button.ent { border: none; }
.label-OTHER { background: #eeeeee; border-bottom: 2px solid #808080; }
.assert-absent { text-decoration: line-through; text-decoration-color: #c00000; text-decoration-thickness: 2px; }
.assert-uncertain { text-decoration: underline dotted; text-decoration-thickness: 2px; }
.selected { outline: 2px solid #000000; }
.legend .ent { cursor: default; }
img.wide { max-width: 100%; height: auto; display: block; }
.slicer { margin: 1em 0; }
.frame { display: inline-grid; grid-template-columns: auto auto auto; align-items: center; justify-items: center; }
.frame .top { grid-column: 2; grid-row: 1; }
.frame .left { grid-column: 1; grid-row: 2; padding-right: 4px; }
.frame #slice-image { grid-column: 2; grid-row: 2; image-rendering: pixelated; }
.frame .right { grid-column: 3; grid-row: 2; padding-left: 4px; }
.frame .bottom { grid-column: 2; grid-row: 3; }
.edge { font-weight: bold; }
#slice-slider { width: 320px; vertical-align: middle; }
table { border-collapse: collapse; }
th, td { border: 1px solid #cccccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.number { text-align: right; }
code { white-space: pre-wrap; word-break: break-all; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  if (!data.entities.length) {
    return;
  }
  var overlay = document.getElementById("overlay");
  var sliceImage = document.getElementById("slice-image");
  var slider = document.getElementById("slice-slider");
  var sliceLabel = document.getElementById("slice-label");
  var heading = document.getElementById("entity-heading");
  var selectable = document.querySelectorAll("[data-entity]");
  var current = -1;

  function showSlice() {
    var entity = data.entities[current];
    var position = Number(slider.value);
    sliceImage.src = entity.slices[position];
    sliceLabel.textContent = "z = " + entity.z[position] + " of 0-" + (data.depth - 1);
  }

  function select(index) {
    var entity = data.entities[index];
    if (!entity || index === current) {
      return;
    }
    current = index;
    overlay.src = entity.overlay;
    heading.textContent = entity.text + " (" + entity.label + ", " + entity.assertion + ")";
    slider.max = String(entity.slices.length - 1);
    slider.value = String(entity.start);
    selectable.forEach(function (node) {
      node.classList.toggle("selected", Number(node.dataset.entity) === index);
    });
    showSlice();
  }

  selectable.forEach(function (node) {
    var index = Number(node.dataset.entity);
    node.addEventListener("click", function () { select(index); });
    node.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        select(index);
      }
    });
  });
  slider.addEventListener("input", showSlice);
  select(0);
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
