"""PNG plots of the experiments (matplotlib's object API on the Agg canvas: no pyplot state, no display)."""
from __future__ import annotations

import os


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("tsc-experiment plots need matplotlib: pip install 'tsc-kernels[experiments]'") from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, out_dir: str, name: str, dpi: int = 90) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi)
    return path


def line_style(i: int, variant: str) -> dict:
    """Colour by position; `dt=1` dashed, since it coincides with `plain` (the same network)."""
    return {"color": f"C{i}", "linestyle": "--" if variant == "dt=1" else "-"}
