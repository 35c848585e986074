"""The notebooks run top to bottom in a real Jupyter kernel and show their figures.

To refresh the committed outputs after changing a notebook or the code it shows:
``python -m tests.test_notebook`` (executes both and writes them back in place; the analysis
notebook reads the newest ``make demo`` checkpoint when there is one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
ANALYSIS = NOTEBOOK.with_name("analysis.ipynb")


def execute(path: Path = NOTEBOOK, timeout: int = 600):
    """Run every cell in order in a fresh ipykernel (the notebook's own folder as working
    directory); raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    ).execute()
    return nb


def _outputs(cell, kind: str) -> list:
    return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_quickstart_notebook_runs_and_shows_every_figure():
    """Every cell runs without error (nbclient raises on the first that fails), the forward
    prints the four taps' prediction shapes, and each figure cell, the last one included,
    displays a PNG (a backend switch in library code used to hide the last ones)."""
    nb = execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    printed = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
    assert "prediction shapes [(3, 576, 27), (3, 144, 27), (3, 36, 27), (3, 9, 27)]" in printed
    assert "masked-cell R²" in printed
    figures = [c for c in code if "figure(" in c.source or "subplots(" in c.source]
    assert len(figures) == 3
    for cell in figures:
        assert len(_outputs(cell, "image/png")) == 1, cell.source
    assert _outputs(code[-1], "image/png"), "the last figure is not displayed"


@pytest.mark.parametrize(
    ("path", "figures"), [(NOTEBOOK, 3), (ANALYSIS, 2)], ids=["quickstart", "analysis"]
)
def test_committed_notebook_has_its_outputs(path, figures):
    """Each notebook is committed executed (so that it reads on GitHub; the analysis one on the
    demo checkpoint when it was refreshed), with all its figures and modest pictures."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    assert sum(len(_outputs(c, "image/png")) for c in code) == figures
    assert all(o.get("output_type") != "error" for c in code for o in c.get("outputs", []))
    assert path.stat().st_size < 800_000


def test_analysis_notebook_runs_on_a_tiny_model(monkeypatch):
    """With LMIM_ANALYSIS_TINY=1 the analysis notebook trains the test ViT for 40 steps itself,
    prints both encoders' NMI per layer (8 values each) and displays its two figures."""
    monkeypatch.setenv("LMIM_ANALYSIS_TINY", "1")
    nb = execute(ANALYSIS)
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
    assert "encoders: ['vit_test, 40 steps', 'vit_test, random init'] at 64 px" in printed
    nmi_lines = [ln for ln in printed.splitlines() if ": NMI [" in ln]
    assert len(nmi_lines) == 2 and all(ln.split("NMI [")[1].count(",") == 7 for ln in nmi_lines)
    figures = [c for c in code if "subplots(" in c.source or "_figure(" in c.source]
    assert [len(_outputs(c, "image/png")) for c in figures] == [1, 1]


if __name__ == "__main__":
    for path in (NOTEBOOK, ANALYSIS):
        executed = execute(path)
        for cell in executed.cells:
            cell.get("metadata", {}).pop("execution", None)  # timings: noise in diffs
        nbformat.write(executed, path)
        print(f"wrote {path}", file=sys.stderr)
