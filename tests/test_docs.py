"""The documentation site builds with warnings as errors, and its code blocks run."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]
#: Pages whose ```python blocks are complete programs, executed in order in one namespace per page.
EXECUTED_PAGES = ["index.md", "conventions.md"]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocstrings_handlers.python")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert elapsed < 60, f"the docs build took {elapsed:.0f} s"
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
