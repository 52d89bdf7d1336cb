"""The documented examples run end to end (``--quick`` sizes) and write their figures."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]

EXAMPLES = {
    "01_quickstart.py": ["01_quickstart.png"],
    "02_lecture_toy_problems.py": ["02_sine_model.png", "02_wide_networks.png"],
    "04_gradient_flow_vs_ensemble.py": ["04_gradient_flow_vs_ensemble.png"],
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_quick_and_writes_its_figures(script, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for figure in EXAMPLES[script]:
        path = tmp_path / figure
        assert path.is_file() and path.stat().st_size > 1000, f"{script} did not write {figure}"
