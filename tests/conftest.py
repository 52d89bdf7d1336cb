import os
import pathlib
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype, restoring the previous default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


FRESH_PROCESS_ENV = "NTKGP_TEST_FRESH_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    """Run tests marked ``fresh_process`` in a new interpreter of their own.

    Peak-memory tests read the process's resident high-water mark. In a process that has run
    hundreds of tests, the allocator holds freed memory that a measured call can reuse without
    the resident size growing (a regression reads as 0 MiB), or holds it in ways that add
    unrelated growth (a 48 MiB peak read as 132 MiB on a CI machine). A new interpreter with a
    fixed ``mmap`` threshold makes every large tensor its own mapping, returned when freed, so
    the high-water mark follows what the measured call keeps alive.
    """
    if pyfuncitem.get_closest_marker("fresh_process") is None or os.environ.get(FRESH_PROCESS_ENV):
        return None
    env = dict(os.environ, **{FRESH_PROCESS_ENV: "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fresh_process", pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"in a fresh process:\n{child.stdout[-6000:]}\n{child.stderr[-2000:]}", pytrace=False)
    if " passed" not in child.stdout:
        if " skipped" in child.stdout:
            pytest.skip(f"skipped in a fresh process: {child.stdout.strip().splitlines()[-1]}")
        pytest.fail(f"the fresh process ran no test:\n{child.stdout[-3000:]}", pytrace=False)
    return True
