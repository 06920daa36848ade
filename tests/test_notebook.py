"""The Colab demo notebook, executed headless on CPU with small step counts (as papermill would:
a cell overriding the parameters is inserted after the cell tagged "parameters")."""

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "m1jax_colab_tpu.ipynb"
SMALL = 'SFT_STEPS, RL_STEPS, PROMPTS, SAMPLES = 3, 2, 4, 4\nCKPT_DIR = {ckpt!r}'


@pytest.mark.parametrize("devices", [1, 8])
def test_notebook_runs_headless(tmp_path, devices):
    """On one CPU device, and on 8 fake ones standing in for a Colab TPU's 8 cores (data parallel)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(at) == 1, "exactly one cell must be tagged 'parameters'"
    nb.cells.insert(at[0] + 1, nbformat.v4.new_code_cell(SMALL.format(ckpt=str(tmp_path / "ckpt"))))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent.parent)}})
    client.execute(env=env)  # raises CellExecutionError naming the failing cell

    def text(cell):
        return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))

    out = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "backend: cpu" in out
    assert ("mesh data=8: 8 of 8 devices" if devices > 1 else "mesh (none: one device): 1 of 1 devices") in out
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "restored step 5 from" in out and "parameters identical = True" in out
    assert (tmp_path / "ckpt" / "checkpoints" / "5").is_dir()
