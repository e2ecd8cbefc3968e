"""The notebooks in examples/: committed without outputs, and each one runs top to bottom (nbclient, a real
ipykernel) in a fresh working folder holding the example images, as when opened in examples/; what they
write to temporary folders lands in pytest's tmp_path (TMPDIR), which pytest clears."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
IMAGE_SUFFIXES = (".png", ".jpg")
CELL_TIMEOUT_S = 300  # one cell; the slowest (05's training) takes well under a minute on 2 cores


def test_the_notebooks_are_there():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_processor.ipynb",
        "02_caption_vqa_chat.ipynb",
        "03_similarity_search.ipynb",
        "04_batch_captioning.ipynb",
        "05_train_bridge.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts: clear all outputs"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the notebook metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    for image in EXAMPLES.iterdir():
        if image.suffix in IMAGE_SUFFIXES:
            shutil.copy(image, tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    # a cell that raises fails the test with its traceback (CellExecutionError)
    client.execute(env={**os.environ, "TMPDIR": str(tmp_path)})
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    shown = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert shown, f"{path.name} shows no picture"
