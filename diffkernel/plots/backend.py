"""Matplotlib, on the non-interactive Agg backend unless another one was chosen first."""

from __future__ import annotations

import os

__all__ = ["pyplot"]


def pyplot():
    import matplotlib

    if "MPLBACKEND" not in os.environ and matplotlib.get_backend().lower() not in (
        "agg",
        "module://matplotlib_inline.backend_inline",
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
