"""The Bayesian-workflow examples run end to end with --quick and write their figures."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _digits_classify(stdout: str) -> None:
    """Example 06 must print a working classifier, not just a figure: the quick run (300 training
    digits) measured 0.85 accuracy and AUROC 0.88-0.91, where chance is 0.1 and 0.5."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[1:2] in (["nngp"], ["ntk"])]
    assert len(rows) == 4, stdout
    for _depth, _kernel, accuracy, auroc in rows:
        assert float(accuracy) > 0.8 and float(auroc) > 0.8, stdout
    # one linearized network on the squared loss and on cross-entropy: both learn (quick run: 0.68
    # after 10 steps, 0.85 after 10000, for each loss)
    table = stdout[stdout.index("steps  squared x-entropy"):].splitlines()[1:5]
    accuracies = [[float(v) for v in line.split()[1:]] for line in table]
    assert [line.split()[0] for line in table] == ["10", "100", "1000", "10000"], stdout
    assert len(accuracies[0]) == 2 and all(a > 0.8 for a in accuracies[-1]), stdout
    assert all(a < b for a, b in zip(accuracies[0], accuracies[-1], strict=True)), stdout


def _fit_improves_nlpd(stdout: str) -> None:
    """Example 03 fits the variances by marginal likelihood: the test NLPD must drop (quick run:
    0.117 at the start, -0.366 after fitting)."""
    match = re.search(r"test NLPD: (\S+) at the start, (\S+) after fitting", stdout)
    assert match, stdout
    assert float(match.group(2)) < float(match.group(1)) - 0.1, stdout


EXAMPLES = [
    ("03_learn_variances.py", "03_learn_variances.png", None, _fit_improves_nlpd),
    ("05_botorch.py", "05_botorch.png", "botorch", None),
    ("06_digits.py", "06_digits.png", "sklearn", _digits_classify),
]


@pytest.mark.parametrize(("script", "figure", "needs", "check_output"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs_quick(tmp_path, script, figure, needs, check_output):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{script} needs {needs}")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    path = tmp_path / figure
    assert path.is_file() and path.stat().st_size > 5000, out.stdout
    assert "figure:" in out.stdout
    if check_output is not None:
        check_output(out.stdout)



def test_botorch_example_without_botorch_says_how_to_install_it(tmp_path):
    """BoTorch is an optional extra; without it the example failed with a bare ModuleNotFoundError."""
    hide = ("import importlib.abc, runpy, sys\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'botorch':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            f"sys.argv = ['05_botorch.py', '--quick', '--out', {str(tmp_path)!r}]\n"
            f"runpy.run_path({str(ROOT / 'examples' / '05_botorch.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert 'needs BoTorch, an optional extra of ntkgp: pip install -e ".[botorch]"' in out.stderr
