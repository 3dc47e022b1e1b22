"""The worked analyses in notebooks/ execute top to bottom (small settings via environment
variables; stored without outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_selinexor_pk_and_xpo1", "02_fit_population_model"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean
    monkeypatch.setenv("PKPD_NOTEBOOK_N", "40")
    monkeypatch.setenv("PKPD_NOTEBOOK_DRAWS", "100")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook should draw its figures"
    assert os.environ.get("PKPD_NOTEBOOK_N") == "40"
