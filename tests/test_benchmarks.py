"""The benchmark scripts behind docs/benchmarks.md run at toy sizes and print their tables
(benchmarks/uci.py, mnist.py, kernel_grad.py and variance_deficit.py have smoke tests of their own)."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("script, args, expected", [
    ("kernels.py", ["--sizes", "20", "--d", "5", "--depth", "2", "--no-compile"], "eager/nt"),
    # blocks of 64 entries: 3 rows of 20 (7 blocks); the column names the size each row used
    ("kernels.py", ["--sizes", "20", "--d", "5", "--depth", "2", "--no-compile", "--repeats", "1",
                    "--block-entries", "64", "1024"], "float64     20      2^6"),
    # a size that is not a power of two is printed as it is (100 was printed as 2^6)
    ("kernels.py", ["--sizes", "20", "--d", "5", "--depth", "2", "--no-compile", "--repeats", "1",
                    "--block-entries", "100"], "float64     20      100"),
    ("predict.py", ["--n", "50", "--m", "20", "--times", "5"], "-> covariance (5, 20, 20)"),
    ("descent.py", ["--n", "30", "--m", "10", "--classes", "3", "--times", "3", "--t-max", "20"], "exact steps"),
    ("quadrature.py", ["--sizes", "10", "--d", "2"], "max rel diff"),
    ("train.py", ["--members", "4", "--width", "16", "--steps", "5"], "the loop"),
    ("relu_bending.py", ["--width", "32", "--members", "2", "--steps", "3"], "moved at random"),
    ("large_test_set.py", ["--n", "30", "--m", "50"], "max difference of the variances / prior scale"),
    ("layernorm.py", ["--sizes", "30", "--repeats", "1"], "exact / T − μ1μ2"),
    ("kernels.py", ["--empirical-diag", "30", "--empirical-width", "16", "--repeats", "1"], "full/diag MiB"),
    ("kernels.py", ["--empirical-jacobian", "30", "--repeats", "1"], "kernel MiB"),
])
def test_benchmark_script_runs_at_toy_size(script, args, expected):
    assert expected in _run(script, args)


def _run(script: str, args: list[str]) -> str:
    """The script's printout, run as a user would (it must exit 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("NTKGP_NT_PYTHON", None)   # the neural-tangents columns need a JAX environment: left out
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_overhead_benchmark_times_every_column_and_compares_two_copies():
    """One row of microseconds per column (NTK/Matern, the mll ratio, last); with ``--against`` the
    package itself as the other copy, imported under another name: a ``new/old`` row of ratios and
    the BoTorch loop of both copies, which compute the same kernels and so find the same best
    acquisition value."""
    args = ["--sizes", "5", "--depths", "1", "--activations", "relu", "--dtypes", "float64", "--repeats", "2",
            "--seconds", "0.001"]
    out = _run("overhead.py", [*args, "--no-botorch"])
    row = next(line.split() for line in out.splitlines() if line.startswith("float64"))
    assert row[:4] == ["float64", "relu", "1", "5"] and len(row) == 11 and all(float(v) > 0 for v in row[4:]), out
    assert "BoTorch" not in out
    out = _run("overhead.py", [*args, "--against", str(ROOT / "ntkgp")])
    ratios = next(line for line in out.splitlines() if line.startswith("  new/old")).split()[2:]
    assert len(ratios) == 12 and all(float(r) > 0 for r in ratios[::2]), out
    values = [line.split()[-1] for line in out.splitlines() if "best acquisition value" in line]
    assert len(values) == 3 and values[0] == values[1], out


def test_kernel_baseline_computes_the_same_kernels_as_ntkgp():
    """The straightforward recursion the benchmark times ntkgp against is the same network's NTK: in
    float64 within 1e-6 of ntkgp's (its ``arccos`` of a clipped correlation loses ~1e-8 near
    ``ρ = 1``), for both activations and all three modes; float32's rows run too."""
    out = _run("kernel_baseline.py", ["--sizes", "40", "--d", "3", "--modes", "nograd", "grad", "diag",
                                      "--repeats", "1"])
    rows = [line.split() for line in out.splitlines() if line.startswith(("relu ", "erf "))]
    assert len(rows) == 12 and "ntkgp/baseline" in out, out
    assert all(float(row[-1]) < 1e-6 for row in rows if row[1] == "float64"), out


def test_bayesopt_benchmark_fits_every_model_at_toy_size():
    """Each model's row: L-BFGS evaluated its loss at least once and the fitted loss is finite."""
    out = _run("bayesopt.py", ["--n", "20", "--m", "10", "--restarts", "1", "--raw-samples", "8", "--repeats", "1"])
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")
            and not line.startswith("|---")]
    assert [r[0] for r in rows] == ["| NTK", "| NNGP", "| RBF (BoTorch default)", "| Matern-5/2"], rows
    for row in rows:
        assert int(row[2].split("(")[1].rstrip(")")) > 0 and math.isfinite(float(row[6])), row


def test_cuda_checks_script_parses_and_names_tests_and_options_that_exist(capsys):
    """benchmarks/cuda_checks.sh runs only where a GPU is lent, rarely: a renamed test or option
    would be found there, in the GPU's time. Its shell must parse, every test it names must exist
    and every option it passes must be one its command takes."""
    from ntkgp.cli import main

    script = ROOT / "benchmarks" / "cuda_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    named = re.findall(r"(tests/test_\w+\.py)::(\w+)", text)
    assert len(named) == 4
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    helps = {"ntkgp compare": capsys.readouterr().out}
    for command in ("benchmarks/train.py", "benchmarks/kernels.py"):
        helps[command] = subprocess.run([sys.executable, str(ROOT / command), "--help"], capture_output=True,
                                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    for command, help_text in helps.items():
        line = next(line for line in text.replace("\\\n", " ").splitlines()
                    if command in line and not line.lstrip().startswith("#"))
        options = re.findall(r"(?<= )--[a-z-]+", line)
        missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", help_text)]
        assert options and not missing, (command, missing)


def _run_cuda_checks(tmp_path, python_status: int) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    """benchmarks/cuda_checks.sh run from a folder outside the checkout with OUT = ``out``, with stand-ins
    for python (echoes, exits ``python_status``) and nvidia-smi: its result and its log's path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, status in (("python-stand-in", python_status), ("nvidia-smi", 0)):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "stand-in $*"\nexit {status}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": "python-stand-in"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_checks.sh"), "out", "60"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    return result, tmp_path / "out" / "cuda_checks.log"


def test_cuda_checks_script_writes_its_log_where_the_caller_names_it(tmp_path):
    """OUT was created relative to the caller's folder, then written relative to the checkout's, where the
    script moves: from another folder, ``tee`` found no OUT there and the log of the GPU's run was lost."""
    result, log = _run_cuda_checks(tmp_path, 0)
    assert log.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    text = log.read_text()
    assert text.count("=== exit status 0") == 7 and "stand-in -m ntkgp compare" in text, text


def test_cuda_checks_script_fails_when_its_environment_check_fails(tmp_path):
    """A python that cannot import torch, gpytorch and ntkgp stops the script before its steps, and the
    script's status says so (the check's exit 1 was lost in the pipe to ``tee``: status 0)."""
    result, log = _run_cuda_checks(tmp_path, 1)
    assert result.returncode == 1 and "===" not in log.read_text(), result.stdout[-2000:]
