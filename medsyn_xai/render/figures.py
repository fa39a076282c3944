"""Matplotlib figures on the Agg canvas: no pyplot, no display, no global backend switch."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["literal", "new_figure", "png_bytes"]


def new_figure(size_px: tuple[int, int], dpi: int) -> Figure:
    """Return an empty figure of ``size_px`` (width, height) pixels at ``dpi``, attached to an Agg canvas."""
    width, height = size_px
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """Encode ``figure`` as PNG at its own dpi, so the image keeps the figure's pixel size."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return buffer.getvalue()


def literal(text: str) -> str:
    """Escape dollar signs so matplotlib draws ``text`` as typed rather than as math."""
    return text.replace("$", r"\$")
