"""The documented examples run end to end (``--quick`` sizes) and write their figures."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]

EXAMPLES = {
    "01_quickstart.py": ["01_quickstart.png"],
    "02_lecture_toy_problems.py": ["02_sine_model.png", "02_wide_networks.png"],
    "04_gradient_flow_vs_ensemble.py": ["04_gradient_flow_vs_ensemble.png"],
    "07_linearized_training.py": ["07_linearized_training.png"],
}


def _numbers(pattern: str, text: str) -> list[float]:
    found = re.findall(pattern, text)
    assert found, f"no line matches {pattern!r}"
    return [float(v) for match in found for v in (match if isinstance(match, tuple) else (match,))]


def _check_lecture_toy_problems(out: str) -> None:
    """Example 02's printed checks (the lecture's exercises), not only that it ran: linear regression's
    Θ = xᵀx' + 1 and the sine model's tangent kernel to rounding, parameter gradient flow equal to the
    output ODE with the moving Θ(t) (solver tolerance 1e-8 with --quick: 1.3e-7), not with the frozen
    Θ(0) (0.28), and Θ(20) → diag(1, 4)."""
    assert max(_numbers(r"max \|Θ − \(xᵀx' \+ 1\)\| = ([0-9.e+-]+)", out)) <= 1e-12
    assert _numbers(r"σ_b²: max error ([0-9.e+-]+)", out)[0] <= 1e-12
    assert _numbers(r"max \|empirical_ntk − formula\| = ([0-9.e+-]+)", out)[0] <= 1e-12
    assert min(_numbers(r"eigenvalues on the training inputs: ([0-9.e+-]+), ([0-9.e+-]+)", out)) > 0
    assert _numbers(r"with Θ\(t\)\| over the path: ([0-9.e+-]+)", out)[0] <= 1e-5
    assert _numbers(r"with Θ\(0\)\| over the path: ([0-9.e+-]+)", out)[0] >= 0.1
    end = _numbers(r"Θ\(20\) = \[\[([0-9.e+-]+), ([0-9.e+-]+)\], \[([0-9.e+-]+), ([0-9.e+-]+)\]\]", out)
    assert max(abs(a - b) for a, b in zip(end, [1.0, 0.0, 0.0, 4.0], strict=True)) <= 1e-3, end


def _check_linearized_training(out: str) -> None:
    """Example 07's table: the trained linearization equals the kernel prediction from the network's
    own NTK to rounding (quick run: 2e-15), and both gaps shrink with the width (quick run: slopes
    -0.76 and -0.46 over widths 32 to 512)."""
    rows = [[float(v) for v in line.split()] for line in out.splitlines()
            if line.split() and line.split()[0].isdigit() and len(line.split()) == 4]
    assert len(rows) == 3, out
    assert max(row[2] for row in rows) <= 1e-10, out
    slopes = _numbers(r"net vs linearized ([0-9.e+-]+), linearized vs infinite ([0-9.e+-]+)", out)
    assert all(-1.2 < s < -0.25 for s in slopes), slopes


CHECKS = {"02_lecture_toy_problems.py": _check_lecture_toy_problems,
          "07_linearized_training.py": _check_linearized_training}


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
    CHECKS.get(script, lambda out: None)(result.stdout)
