"""Figures drawn by Agg directly: no pyplot, no figure manager, no GUI event loop.

pyplot costs an import and a global registry of open figures that callers would have
to close; the displays are written as PNGs, for which a bare
:class:`matplotlib.figure.Figure` on an Agg canvas is all that is needed. In an IPython
session (a notebook) figures are made through pyplot instead, so that they show inline
as they always did.
"""

from __future__ import annotations

import os
import sys

__all__ = ["new_figure", "save_figure", "pyplot"]

#: Resolution of the written PNGs (the figures are sized in inches for it).
DPI = 100


def _interactive() -> bool:
    """True inside IPython (a notebook or a console), where figures should show."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def new_figure(width: float, height: float, **kwargs):
    """A figure of ``width`` x ``height`` inches on an Agg canvas (or pyplot's in IPython).

    Keyword arguments go to :class:`matplotlib.figure.Figure` (``layout=...``).
    """
    if _interactive():
        return pyplot().figure(figsize=(width, height), dpi=DPI, **kwargs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG at :data:`DPI`, in one draw.

    Not ``bbox_inches="tight"``: that draws the figure twice. The figures here lay
    themselves out to fit their canvas.
    """
    # zlib level 1: a third of the encoding time of the default 6 for files a
    # quarter larger; the encoding was the largest single cost of the figures.
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 1})
    if _interactive():
        pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot, on the Agg backend unless another one was chosen first."""
    import matplotlib

    if "MPLBACKEND" not in os.environ and matplotlib.get_backend().lower() not in (
        "agg",
        "module://matplotlib_inline.backend_inline",
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
