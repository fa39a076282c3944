"""Write the renderers' PNG and HTML output to files, with names derived from the study and entity."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import structlog

from medsyn_xai.render.charts import render_token_chart
from medsyn_xai.render.maps import check_window, entities_of, find_entity, resolve_entity
from medsyn_xai.render.overlays import entity_triplanar, render_joint
from medsyn_xai.render.report import build_report
from medsyn_xai.store import StudyStore

__all__ = ["entity_png_name", "write_entity_pngs", "write_joint_png", "write_report"]

log = structlog.get_logger(__name__)


def _stem(text: str) -> str:
    """Lowercase ``text`` with every run of characters other than a-z and 0-9 replaced by "_", at most 40 long."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40].rstrip("_") or "entity"


def entity_png_name(store: StudyStore, index: int) -> str:
    """Return ``<study id>_entity_<index:02d>_<text>.png`` for entity ``index``."""
    text = str(store.entities[index].get("text", ""))
    return f"{store.study_id}_entity_{index:02d}_{_stem(text)}.png"


def write_entity_pngs(
    store: StudyStore, out_dir: Path | str, *, entity: str | None = None, window: str = "lung"
) -> list[Path]:
    """Write one tri-planar PNG per entity (or only ``entity``) and the token chart into ``out_dir``.

    Args:
        store: an open study.
        out_dir: output folder, created when missing.
        entity: text of the only entity to render (case-insensitive). Default: None (all).
        window: CT window, "lung" or "mediastinum". Default: "lung".

    Returns:
        Paths of the written files: entity PNGs (1500 x 520 pixels) in entity order,
        then ``<study id>_tokens.png`` (1500 x 600 pixels). A study without entities
        gets only the token chart.

    Raises:
        EntityNotFoundError: ``entity`` is not in the study.
        ValueError: unknown window.
    """
    check_window(window)
    indices = [find_entity(store, entity)] if entity is not None else list(range(len(entities_of(store))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmaps = store.entity_heatmaps if indices else None
    written = []
    for index in indices:
        path = out_dir / entity_png_name(store, index)
        path.write_bytes(entity_triplanar(store, index, window=window, heatmaps=heatmaps).png)
        written.append(path)
    chart = out_dir / f"{store.study_id}_tokens.png"
    chart.write_bytes(render_token_chart(store))
    written.append(chart)
    log.info("renders_written", study_id=store.study_id, path=str(out_dir), n_files=len(written), window=window)
    return written


def write_joint_png(
    store: StudyStore, out_dir: Path | str, a: int | str, b: int | str, *, window: str = "lung"
) -> tuple[Path, dict[str, Any]]:
    """Write ``<study id>_joint_<a>_<b>.png`` (1500 x 520 pixels) for two entities into ``out_dir``.

    Returns:
        The PNG's path and the overlap dict of :func:`render_joint` (dice, slices, ...).
    """
    check_window(window)
    first, second = resolve_entity(store, a), resolve_entity(store, b)
    png, summary = render_joint(store, first, second, window=window)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{store.study_id}_joint_{first:02d}_{second:02d}_{_stem(summary['a'])}_{_stem(summary['b'])}.png"
    path.write_bytes(png)
    log.info("joint_written", study_id=store.study_id, path=str(path), dice=summary["dice"])
    return path, summary


def write_report(store: StudyStore, out_file: Path | str | None = None, *, window: str = "lung") -> Path:
    """Write the study's HTML report (see :func:`build_report`) as UTF-8.

    Args:
        store: an open study.
        out_file: HTML file to write; its folder is created when missing. Default:
            None (``<study id>_report.html`` in the current folder).
        window: CT window, "lung" or "mediastinum". Default: "lung".
    """
    path = Path(out_file) if out_file is not None else Path(f"{store.study_id}_report.html")
    page = build_report(store, window=window)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    log.info("report_written", study_id=store.study_id, path=str(path), n_bytes=len(page))
    return path
