"""The quick-start notebook runs top to bottom."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs():
    """Execute every code cell in order in one namespace (no Jupyter kernel needed)."""
    matplotlib.use("Agg")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 4
    namespace: dict = {}
    for src in code:
        exec(compile(src, str(NOTEBOOK), "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    assert out.loss.ndim == 0 and len(out.preds) == 4
    assert [tuple(p.shape[1:]) for p in out.preds] == [(576, 27), (144, 27), (36, 27), (9, 27)]
