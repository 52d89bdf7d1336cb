"""The documentation site builds with warnings as errors, and its code blocks run."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ntkgp import predict

ROOT = pathlib.Path(__file__).parents[1]
#: Pages whose ```python blocks are complete programs, executed in order in one namespace per page.
EXECUTED_PAGES = ["index.md", "conventions.md"]


def _require_docs_stack() -> None:
    """Skip where the docs tools are not installed. An installed stack that cannot be imported
    (mkdocstrings-python 1.8, the old floor, against griffe 2: "No module named 'griffe.collections'")
    fails instead: ``importorskip`` skipped it, and a broken docs build went unnoticed."""
    for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[docs]')")
    for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        importlib.import_module(name)


def test_mkdocs_build_strict(tmp_path):
    _require_docs_stack()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    layers = (tmp_path / "api" / "layers" / "index.html").read_text()
    assert 'id="ntkgp.Dense"' in layers and 'id="ntkgp.Layer.kernel"' in layers  # docstrings were rendered
    for page in ("index.html", "theory/index.html", "conventions/index.html", "numerics/index.html",
                 "benchmarks/index.html", "tutorials/quickstart/index.html",
                 "tutorials/lecture_toy_problems/index.html"):
        assert (tmp_path / page).is_file(), page


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_code_blocks_of_page_run(page):
    text = (ROOT / "docs" / page).read_text()
    blocks = [part.split("```")[0] for part in text.split("```python")[1:]]
    assert blocks, f"no python blocks in {page}"
    namespace: dict = {}
    for source in blocks:
        exec(compile(source, f"docs/{page}", "exec"), namespace)


#: Shapes that the comments of a page's code blocks state, as expressions evaluated after its blocks ran.
STATED_SHAPES = {
    "README.md": {"k.nngp": (10, 4), "k.ntk": (10, 4), "d.nngp": (10,), "d.ntk": (10,), "f": (10, 1),
                  "out.mean": (20, 4, 1), "out.covariance": (20, 4, 4)},
    "docs/index.md": {"k.nngp": (15, 100), "k.ntk": (15, 100), "post.mean": (100,), "out.mean": (3, 100)},
}


@pytest.mark.parametrize("page", sorted(STATED_SHAPES))
def test_code_blocks_of_readme_and_home_page_give_the_shapes_their_comments_state(page):
    """The README's blocks (not run elsewhere: only docs/index.md and docs/conventions.md were) and the
    home page's quickstart run in order in one namespace, and give the shapes their comments state."""
    import gpytorch

    text = (ROOT / page).read_text()
    namespace: dict = {}
    for source in [part.split("```")[0] for part in text.split("```python")[1:]]:
        exec(compile(source, page, "exec"), namespace)
    for expression, shape in STATED_SHAPES[page].items():
        assert tuple(eval(expression, namespace).shape) == shape, expression
        assert str(shape) in text, f"the page no longer states {shape} for {expression}"
    if page == "README.md":
        assert isinstance(namespace["gp_kernel"], gpytorch.kernels.Kernel)


def test_lecture_tutorial_sine_snippet_runs_in_its_example_and_prints_the_page_output(capsys):
    """The sine-model snippet of docs/tutorials/lecture_toy_problems.md, run after the setup of
    examples/02_lecture_toy_problems.py (its float64 ``X``), prints the tensor the page shows. It
    passed float32 parameters with float64 inputs, which ``empirical_ntk`` refuses with ``ValueError``."""
    import runpy

    text = (ROOT / "docs" / "tutorials" / "lecture_toy_problems.md").read_text()
    blocks = [part.split("```")[0] for part in text.split("```python")[1:]]
    snippet = [source for source in blocks if "def sine(" in source]
    assert len(snippet) == 1, "the sine-model snippet is gone"
    namespace = runpy.run_path(str(ROOT / "examples" / "02_lecture_toy_problems.py"), run_name="example_02")
    capsys.readouterr()
    exec(compile(snippet[0], "docs/tutorials/lecture_toy_problems.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("tensor(") and "dtype=torch.float64" in printed, printed
    shown = [part.split("```")[0] for part in text.split("```text")[1:]]
    assert any(printed in block for block in shown), f"the page does not show what the snippet prints:\n{printed}"


#: Import names of packages that ``pip install -e .`` does not install, and how a page says to get them.
OPTIONAL_IMPORTS = {"botorch": 'pip install -e ".[botorch]"', "sklearn": "pip install scikit-learn"}


def test_tutorials_say_how_to_install_what_their_example_imports_beyond_the_base_install():
    """A reader who ran ``pip install -e .`` and then an example got ``ModuleNotFoundError: sklearn``
    (06) or ``botorch`` (05): each tutorial names the install of its example's optional imports."""
    import ast

    checked = 0
    for page in sorted((ROOT / "docs" / "tutorials").glob("*.md")):
        text = page.read_text()
        for script in sorted(set(re.findall(r"examples/(\d\d_\w+\.py)", text))):
            tree = ast.parse((ROOT / "examples" / script).read_text())
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            for module in sorted(imported & OPTIONAL_IMPORTS.keys()):
                checked += 1
                assert OPTIONAL_IMPORTS[module] in text, f"{page.name}: {script} imports {module}"
    assert checked >= 2   # 05 (botorch) and 06 (sklearn)


PUBLIC_MODULES = ["ntkgp", "ntkgp.layers", "ntkgp.kernels", "ntkgp.predict", "ntkgp.finite", "ntkgp.compare",
                  "ntkgp.bayes", "ntkgp.models"]


def _unannotated(function) -> list[str]:
    signature = inspect.signature(function)
    missing = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty
               and p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if signature.return_annotation is inspect.Signature.empty and function.__name__ != "__init__":
        missing.append("return")
    return missing


def test_every_public_object_has_a_docstring_and_type_hints():
    """Each public package names its public objects in ``__all__``; each of them (classes and
    their public methods, functions) has a docstring, and every function and method is
    annotated (the standard the API pages rely on: mkdocstrings renders the hints)."""
    problems = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if not hasattr(module, "__all__"):
            problems.append(f"{module_name} has no __all__")
            continue
        for name in module.__all__:
            obj = getattr(module, name)
            where = f"{module_name}.{name}"
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not inspect.getdoc(obj):
                problems.append(f"{where}: no docstring")
            if inspect.isfunction(obj):
                members = {where: obj}
            else:   # methods defined here; getdoc finds a docstring an overridden method inherits
                members = {f"{where}.{attr}": getattr(obj, attr) for attr, value in vars(obj).items()
                           if inspect.isfunction(value) and (attr == "__init__" or not attr.startswith("_"))}
            for member, function in members.items():
                if not member.endswith("__init__") and not inspect.getdoc(function):
                    problems.append(f"{member}: no docstring")
                if missing := _unannotated(function):
                    problems.append(f"{member}: no type hint for {missing}")
    assert not problems, "\n".join(problems)


#: A number as the pages write it: ``2.6e-16``, ``8.6e-10``.
NUMBER = r"(\d(?:\.\d+)?e-\d+)"


def _quoted(pattern: str, text: str) -> float:
    """The number that ``pattern`` (one ``NUMBER`` group; any whitespace matches a line break) quotes in ``text``."""
    found = re.search(pattern.replace(" ", r"\s+"), text)
    assert found, f"the page no longer says {pattern!r}"
    return float(found.group(1))


def _kernel_errors_against_neural_tangents() -> tuple[np.ndarray, float, dict[str, float]]:
    """Relative Frobenius errors of every reference matrix of tests/test_neural_tangents.py (over
    the entries where neural-tangents is finite), the largest relative error of one entry, and per
    architecture the largest difference relative to the largest entry of its matrices."""
    from nt_specs import build, load

    specs, arrays = load("nt_kernels.npz")
    x1, x2 = torch.tensor(arrays["x1"], dtype=torch.float64), torch.tensor(arrays["x2"], dtype=torch.float64)
    per_matrix, worst_entry, per_largest = [], 0.0, {}
    for name in sorted(specs):
        net = build(specs[name])
        with torch.no_grad():
            cross, self_ = net.kernel(x1, x2), net.kernel(x1)
        largest = 0.0
        for key, ours in (("nngp", cross.nngp), ("ntk", cross.ntk), ("nngp11", self_.nngp), ("ntk11", self_.ntk)):
            theirs = arrays[f"{name}/{key}"]
            finite = np.isfinite(theirs)
            diff, ref = np.where(finite, ours.numpy() - theirs, 0.0), np.where(finite, theirs, 0.0)
            per_matrix.append(np.linalg.norm(diff) / np.linalg.norm(ref))
            worst_entry = max(worst_entry, float(np.max(np.abs(diff)[ref != 0] / np.abs(ref[ref != 0]))))
            largest = max(largest, float(np.abs(diff).max() / np.abs(ref).max()))
        per_largest[name] = largest
    return np.array(per_matrix), worst_entry, per_largest


def test_conventions_quotes_the_measured_agreement_of_kernels_with_neural_tangents():
    """The first paragraph of docs/conventions.md (and its Gabor row) quote the agreement with
    neural-tangents' fixtures. The largest errors are neural-tangents' own rounding where a point
    meets itself (fixed numbers of the fixture: within 5 %); the median and Gabor's are rounding
    of both libraries, which varies with the platform's libm (within a factor 2). The page said
    "up to 2.2e-9 per matrix and 4.7e-9 per entry" (measured: 8.6e-10 and 1.8e-9) and Gabor
    "6e-16 apart" (measured: 2.0e-15); then "2e-15 apart", where another machine measured 5.5e-16, so
    Gabor's is quoted as the range of the platforms seen."""
    text = (ROOT / "docs" / "conventions.md").read_text()
    per_matrix, worst_entry, per_largest = _kernel_errors_against_neural_tangents()
    median = _quoted(f"kernels to a relative {NUMBER}", text)
    assert median / 2 <= float(np.median(per_matrix)) <= 2 * median
    assert _quoted(f"up to {NUMBER} per matrix", text) == pytest.approx(per_matrix.max(), rel=0.05)
    assert _quoted(f"and {NUMBER} per entry", text) == pytest.approx(worst_entry, rel=0.05)
    counts = re.search(r"the (\d+) matrices of the (\d+) reference\s+architectures", text)
    assert counts and (int(counts[1]), int(counts[2])) == (len(per_matrix), len(per_largest))
    low = _quoted(f"the same kernels, {NUMBER} to", text)
    high = _quoted(f"to {NUMBER} apart relative to their largest entry", text)
    assert low / 2 <= per_largest["gabor"] <= 2 * high


def _prediction_errors_against_neural_tangents() -> tuple[np.ndarray, float, float]:
    """Relative Frobenius errors of the 72 comparisons of tests/test_predict.py that feed
    neural-tangents' own kernel matrices to the prediction formulas (means and covariances of
    ``GradientFlow`` and ``GPPosterior``, outputs of ``gradient_descent_mse``), and the end-to-end
    errors of the NTK mean and covariance with ntkgp's own kernels."""
    import test_predict as tp

    errors = []
    for get, where, tname, reg in tp.ENSEMBLE_CASES:
        flow = predict.GradientFlow(tp.FixedKernels(), tp.X_TRAIN, tp.Y_TRAIN, kernel=get, learning_rate=tp.LR,
                                    diag_reg=reg)
        out = flow.predict(tp.X_TEST if where == "test" else None, t=tp.T_VALUES[tname])
        key = f"ensemble/{get}/{where}/{tname}/reg{reg}"
        errors += [tp._rel(out.mean, tp.DATA[key + "/mean"]), tp._rel(out.covariance, tp.DATA[key + "/cov"])]
    for get in ("nngp", "ntk", "ntkgp"):
        for scale in ("rel", "abs"):
            key = f"gp/{get}/{scale}"
            reg = float(tp.DATA[key + "/diag_reg"])
            prior = tp.DATA["nngp_dd" if get == "nngp" else "ntk_dd"]
            noise = reg if scale == "abs" else reg * np.trace(prior) / prior.shape[0]
            out = predict.GPPosterior(tp.FixedKernels(), tp.X_TRAIN, tp.Y_TRAIN, kernel=get, noise=noise).predict(
                tp.X_TEST)
            errors += [tp._rel(out.mean, tp.DATA[key + "/mean"]), tp._rel(out.covariance, tp.DATA[key + "/cov"])]
    f0, ft0 = torch.tensor(tp.DATA["fx_train_0"]), torch.tensor(tp.DATA["fx_test_0"])
    for tname, t in (("times", tp.TIMES), ("none", None)):
        train, test = predict.gradient_descent_mse(torch.tensor(tp.DATA["ntk_dd"]), tp.Y_TRAIN, fx_train_0=f0,
                                                   ntk_test_train=torch.tensor(tp.DATA["ntk_td"]), fx_test_0=ft0,
                                                   t=t, learning_rate=tp.LR)
        errors += [tp._rel(train, tp.DATA[f"single/{tname}/train"]), tp._rel(test, tp.DATA[f"single/{tname}/test"])]
    own = predict.gradient_flow(tp.NET, tp.X_TRAIN, tp.Y_TRAIN, tp.X_TEST, t=tp.TIMES, learning_rate=tp.LR,
                                kernel="ntk")
    key = "ensemble/ntk/test/times/reg0.0"
    return np.array(errors), tp._rel(own.mean, tp.DATA[key + "/mean"]), tp._rel(own.covariance, tp.DATA[key + "/cov"])


def test_conventions_quotes_the_measured_agreement_of_predictions_with_neural_tangents():
    """docs/conventions.md quotes how closely the prediction formulas, fed neural-tangents' kernel
    matrices, reproduce its predictions. It said "to 2.3e-14", where this machine (an AMD EPYC)
    measures 1.7e-13: the largest error, the NNGP mean at t = ∞ through the eigendecomposition of a
    training kernel of condition number 706, is LAPACK's rounding, which varies with the machine, so
    the page quotes it with the other machine's value (the measured largest lies between half the low
    one and twice the high one). The median and the end-to-end NTK errors (neural-tangents' own NTK
    diagonal, a fixed number of the fixture) within a factor 2 and 5 %."""
    text = (ROOT / "docs" / "conventions.md").read_text()
    errors, end_to_end_mean, end_to_end_cov = _prediction_errors_against_neural_tangents()
    assert len(errors) == int(re.search(r"over the (\d+) comparisons of `tests/test_predict.py`", text)[1])
    median = _quoted(f"\\(median {NUMBER} over the", text)
    assert median / 2 <= float(np.median(errors)) <= 2 * median
    high = _quoted(f"kernel matrices, to {NUMBER} \\(median", text)
    low = _quoted(f"varies with the machine: {NUMBER} on another", text)
    assert low / 2 <= errors.max() <= 2 * high
    assert _quoted(f"by {NUMBER} relative in the mean", text) == pytest.approx(end_to_end_mean, rel=0.05)
    assert _quoted(f"and {NUMBER} in the covariance", text) == pytest.approx(end_to_end_cov, rel=0.05)


def test_theory_says_that_build_refuses_a_layernorm_over_one_output():
    """docs/theory.md, "What follows the readout": a LayerNorm over a single output would output 0,
    which net.build refuses (the page said the built network's output is 0)."""
    import ntkgp

    section = (ROOT / "docs" / "theory.md").read_text().split("## What follows the readout")[1].split("\n## ")[0]
    with pytest.raises(ValueError, match="outputs 0 for every input"):
        ntkgp.serial(ntkgp.Dense(4), ntkgp.ReLU(), ntkgp.Dense(1), ntkgp.LayerNorm()).build(in_features=2, seed=0)
    assert "so `net.build` refuses it" in section
