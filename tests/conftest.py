import os
import pathlib
import signal
import subprocess
import sys
import threading

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


def _cpu_half_products() -> bool:
    """Whether this torch multiplies float16 matrices on the CPU (torch 2.1, the declared floor, does
    not: '"addmm_impl_cpu_" not implemented for 'Half'', and the same for batched products)."""
    a = torch.ones(1, 1, 1, dtype=torch.float16)
    try:
        a[0] @ a[0], a @ a, torch.baddbmm(a, a, a)
    except RuntimeError:
        return False
    return True


#: For the tests that run float16 networks on the CPU; what they test is ntkgp's, the products torch's.
needs_cpu_half_products = pytest.mark.skipif(not _cpu_half_products(),
                                             reason="this torch has no float16 matrix products on the CPU (torch 2.1)")

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


def status_mib(field: str) -> float | None:
    """A field of Linux's ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_mib("VmHWM") is not None


def peak_above_current(fn) -> float:
    """Peak resident memory (MiB) of ``fn()`` above the memory resident before it, in a test marked
    ``fresh_process`` (skipped where Linux's resettable peak is not available)."""
    if not os.environ.get(FRESH_PROCESS_ENV):
        raise RuntimeError("peaks are only meaningful in a fresh process: mark the test fresh_process")
    if not _reset_peak():
        pytest.skip("needs Linux's resettable peak RSS (/proc/self/clear_refs)")
    base = status_mib("VmRSS")
    fn()
    peak = status_mib("VmHWM")
    assert base is not None and peak is not None   # both read after the reset succeeded
    return peak - base


TIMEOUT_ENV = "NTKGP_TEST_TIMEOUT"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Fail a test that runs past ``NTKGP_TEST_TIMEOUT`` seconds (default 900; 0 switches it off).

    A loop that never ends (a mutation that left the training's record steps unsorted did) stalled
    the whole run until CI's own limit, naming nothing; the alarm interrupts Python code and fails
    that test by name. The slowest test took 116 s on a slow 2-core machine (2026-12-02).
    """
    limit = float(os.environ.get(TIMEOUT_ENV, "900"))
    if limit <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past {limit:g} s ({TIMEOUT_ENV}); it failed instead of stalling "
                           "the run")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
