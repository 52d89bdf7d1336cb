"""What an installation at the declared dependency floors (pyproject.toml) needs from torch."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import ntkgp

#: Evaluated in a fresh interpreter whose torch lacks the spellings that torch 2.1 (the declared floor)
#: does not have: ``torch.compiler.is_compiling`` (2.1 has ``torch._utils.is_compiling``, which in
#: newer torch calls the former) and ``torch._C._functorch.maybe_current_level``. The newer torch's own
#: ``torch.func`` needs ``torch.compiler.is_compiling``: it is put back before the transforms (the plain
#: kernel runs without it).
_WITHOUT_NEW_SPELLINGS = """
import json, sys
import torch
is_compiling = getattr(torch.compiler, "is_compiling", torch._utils.is_compiling)
for owner, name in ((torch._C._functorch, "maybe_current_level"), (torch.compiler, "is_compiling")):
    if hasattr(owner, name):   # torch 2.1 itself has neither
        delattr(owner, name)
torch._utils.is_compiling = is_compiling
import ntkgp
sys.path.insert(0, sys.argv[1])
from test_install import _values
out = {"kernel": _values(ntkgp, plain=True)}
torch.compiler.is_compiling = is_compiling
out["transforms"] = _values(ntkgp, plain=False)
print(json.dumps(out))
"""


def _values(ntkgp, plain: bool) -> list[str]:
    """NNGP and NTK of a ReLU/erf network at a duplicate point (``plain``), or its input Jacobian
    by forward mode and the kernel under vmap, as exact float64 hex strings."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[4] = x[0]
    net = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.ReLU(), ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(),
                       ntkgp.Dense(1))
    if plain:
        k = net.kernel(x)
        parts = [k.nngp, k.ntk]
    else:
        ntk = lambda z: net.kernel(z).ntk  # noqa: E731
        parts = [torch.func.jacfwd(ntk)(x), torch.func.vmap(ntk)(torch.stack([x, 2 * x]))]
    return [v.hex() for p in parts for v in p.reshape(-1).tolist()]


def test_kernels_and_transforms_need_no_torch_newer_than_the_floor():
    """pyproject.toml and the README promise torch >= 2.1, but every activation kernel called
    ``torch.compiler.is_compiling`` and ``torch._C._functorch.maybe_current_level``, which torch 2.1
    does not have (AttributeError on the first ReLU). Without them the values are bitwise the same."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(pathlib.Path(ntkgp.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_NEW_SPELLINGS, str(pathlib.Path(__file__).parent)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["kernel"] == _values(ntkgp, plain=True)
    assert out["transforms"] == _values(ntkgp, plain=False)


def test_every_documented_subpackage_is_reachable_after_import_ntkgp():
    """README lists ntkgp.models and ntkgp.compare, but a plain ``import ntkgp`` left both
    undefined (AttributeError). They load on first use, so the import itself stays light (no
    matplotlib, no scipy.stats)."""
    # scipy.stats (for AUROC's ranks) took 0.8 s of the 4 s import
    code = ("import sys, ntkgp; light = 'matplotlib' not in sys.modules and 'scipy.stats' not in sys.modules; "
            "print(light, ntkgp.models.NetworkGP.__name__, ntkgp.compare.run_comparison.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "NetworkGP", "run_comparison"]
    for name in ("bayes", "finite", "predict", "kernels", "layers"):
        assert hasattr(ntkgp, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ntkgp.nothing  # noqa: B018


@pytest.mark.parametrize("name, spelled", [
    ("Relu", "ntkgp.ReLU()"), ("Sigmoid_like", "ntkgp.SigmoidLike()"),
    ("FanInSum", 'ntkgp.parallel(f, g, join="sum")'), ("ElementwiseNumerical", "ntkgp.Numerical("),
])
def test_neural_tangents_names_say_what_ntkgp_calls_them(name, spelled):
    """A port that kept stax's names (ntkgp.Relu()) met a bare "has no attribute 'Relu'"; other
    misspellings get Python's own suggestion, which needs the error's name and obj."""
    with pytest.raises(AttributeError, match=f"stax.{name} is {re.escape(spelled)}"):
        getattr(ntkgp, name)
    with pytest.raises(AttributeError, match=r"nt\.linearize is ntkgp\.finite\.linearize\(model\)"):
        ntkgp.linearize  # noqa: B018
    with pytest.raises(AttributeError, match=r"stax\.Conv has no counterpart, ntkgp's architectures are fully conn"):
        ntkgp.Conv  # noqa: B018
    with pytest.raises(AttributeError, match=r"stax\.ExpNormalized has no counterpart, it is a kernel map without"):
        ntkgp.ExpNormalized  # noqa: B018
    with pytest.raises(AttributeError, match=r"nt\.batch is not needed"):
        ntkgp.batch  # noqa: B018
    with pytest.raises(AttributeError, match=r"nt\.stax is ntkgp itself"):
        ntkgp.stax  # noqa: B018
    with pytest.raises(AttributeError) as error:
        ntkgp.Rbff  # noqa: B018
    assert error.value.name == "Rbff" and error.value.obj is ntkgp   # "Did you mean: 'Rbf'?" when printed


def test_a_test_that_never_ends_fails_by_name(tmp_path):
    """conftest's alarm: a test past NTKGP_TEST_TIMEOUT fails with its name instead of stalling the run
    (here a 1 s limit against an endless loop, in a pytest run of its own that uses this conftest)."""
    (tmp_path / "conftest.py").write_text((pathlib.Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_endless.py").write_text("def test_endless():\n    while True:\n        pass\n")
    env = {**os.environ, "NTKGP_TEST_TIMEOUT": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 1, child.stdout[-2000:]
    assert "test_endless.py::test_endless ran past 1 s (NTKGP_TEST_TIMEOUT)" in child.stdout, child.stdout[-2000:]


def test_the_floor_script_parses_and_pins_the_declared_torch_floor():
    """``.ci/floor`` builds the venv of the torch floor by hand (not in CI: it downloads ~2.7 GB); its
    pin must be a release of the floor that pyproject.toml declares, and its shell must parse."""
    root = pathlib.Path(__file__).parents[1]
    script = root / ".ci" / "floor"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    pinned = re.search(r"^TORCH_FLOOR=(\d+)\.(\d+)\.\d+$", script.read_text(), re.M)
    declared = re.search(r'"torch>=(\d+)\.(\d+)"', (root / "pyproject.toml").read_text())
    assert pinned and declared and pinned.groups() == declared.groups()
