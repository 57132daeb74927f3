"""examples/quickstart.ipynb runs end to end (nbclient, CPU-small settings, its runs in a temporary folder) and is
stored without outputs."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(900)
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MUCS_POINTER_TO", str(tmp_path))  # its data, runs and plots go here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells
                      if c.cell_type == "code" for o in c.outputs)
    assert "top-5 ids of target 0" in outputs and "auc_target" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (tmp_path / "logs" / "digits_dit_edm_s1_k2.0_na3_sb0--post_pixel" / "gpost.manifest.json").exists()
    assert not [c for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
