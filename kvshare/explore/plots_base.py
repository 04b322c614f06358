"""The figure plumbing every plot shares: :class:`ShownFigure` (a ``Figure`` a notebook shows
as a PNG), the two resolutions and :func:`save_figure` (lay out, write the PNG)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DPI = 110  # PNG files (docs/)
SHOWN_DPI = 72  # PNGs a notebook keeps: small enough for a code host to render


class ShownFigure(Figure):
    """A matplotlib ``Figure`` that notebooks display as a PNG (at :data:`SHOWN_DPI`) without
    pyplot or a backend: ``_repr_png_``, IPython's rich display hook."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=SHOWN_DPI)
        return buf.getvalue()


def save_figure(fig: Figure, path: str | Path | None, legend_from: Any = None) -> Figure:
    """Lay out (with ``legend_from``'s legend in one row below the axes), write ``path``."""
    if legend_from is None:
        fig.tight_layout()
    else:
        handles, names = legend_from.get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, ncol=len(names), loc="lower center")
        fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig
