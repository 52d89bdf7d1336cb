r"""The CPU engine of :func:`ntkgp.finite.train_ensemble` for plain MLPs: one member at a time, in cache.

The stacked step (``train.py``) trains every member at once. With few training points its step
is bound by memory: it streams the whole ensemble's weights in four passes per step (forward
product, backward product, and the update, which reads and writes them), in matrix products of as
many rows as there are training points, which run at a fraction of the CPU's speed
(docs/benchmarks.md). For networks
``Dense → activation → … → Dense`` on the CPU, :class:`FusedSteps` hands the same stacked
weights to a small C kernel (``_fused_mlp.c``) that trains one member at a time for many steps
while its weights stay in cache, with two passes over each weight matrix per step: the forward
product, and the backward product fused with the update. Members are shared out among
``torch.get_num_threads()`` threads. Each member's arithmetic is the stacked step's, with the same
formulas in the same order of updates (``W ← W − η_W uᵀδ``, ``b ← b − η_b c Σδ``, every ``δ``
from the weights before the step), so the two engines agree to rounding; a member's result does
not depend on the number of threads.

The kernel is compiled on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``) for this CPU (``-march=native``) and cached under ``$NTKGP_CACHE_DIR`` (default
``$XDG_CACHE_HOME/ntkgp``, that is ``~/.cache/ntkgp``), keyed by the source, the flags, the
compiler and the CPU, each library beside its SHA-256 digest: one that does not match (a copy cut
short) or has none is rebuilt, never loaded; one that matches but does not load is deleted and
rebuilt. Without a working compiler, or without a folder to compile in, ``train_ensemble`` uses the
stacked step, and ``engine="auto"`` says so once per process and dtype (a ``RuntimeWarning``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ntkgp._warnings import caller_stacklevel
from ntkgp.layers.activations import ActivationModule, _abrelu, _erf
from ntkgp.layers.dense import DenseModule

SOURCE = Path(__file__).with_name("_fused_mlp.c")

#: Compiler flags tried in order: vectorized erf/exp from glibc's libmvec; without it (other C
#: libraries; erf then costs ~20 ns a call); without -march=native (compilers that lack it).
_FLAG_SETS = (
    (["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"], ["-lmvec", "-lm"]),
    (["-O3", "-march=native", "-fno-math-errno"], ["-lm"]),
    (["-O3", "-fno-math-errno"], ["-lm"]),
)
_ACTIVATION_CODES = {"identity": 0, "erf": 1, "abrelu": 2}
#: Seconds one call into the kernel should take: bounds how late a progress bar and Ctrl-C respond.
_CALL_SECONDS = 0.2

#: Why the kernel does not apply to readout-only training.
TRAINS_EVERY_PARAMETER = "it trains every parameter (not the readout alone)"

_libraries: dict[torch.dtype, ctypes.CDLL | str] = {}
_warned: set[torch.dtype] = set()   # the dtypes whose stacked fallback warn_fallback reported
_lock = threading.Lock()


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: a library from another CPU could use missing instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    base: str | Path | None = os.environ.get("NTKGP_CACHE_DIR") or None   # empty: unset
    if base is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ntkgp"
    # absolute: ctypes reads a bare file name as a library to search for on the system's path
    return Path(base).expanduser().resolve()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _load(path: Path) -> ctypes.CDLL:
    """The library at ``path``; ``OSError`` if it cannot be loaded or lacks the kernel's functions."""
    library = ctypes.CDLL(str(path))
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    try:
        library.ntkgp_work_size.restype = integer
        library.ntkgp_work_size.argtypes = [integer, pointer, integer]
        library.ntkgp_train.restype = integer
        library.ntkgp_train.argtypes = [integer, integer, pointer, pointer, pointer, pointer, pointer, pointer,
                                        pointer, pointer, pointer, pointer, pointer, integer, integer, pointer,
                                        integer, pointer, pointer]
    except AttributeError as error:   # a library of that name, but not this kernel
        raise OSError(str(error)) from None
    return library


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """Whether the cached library at ``path`` is the one written beside its digest (no digest: not
    known to be, as for a cache from before digests): ``dlopen`` of a truncated library (a copy cut
    short, a crash between write and flush) killed the process with a bus error, in every later process too."""
    try:
        return Path(f"{path}.sha256").read_text().strip() == _digest(path)
    except OSError:   # no digest, or no library
        return False


def _store(built: Path, target: Path) -> None:
    """Move ``built`` into the cache as ``target`` (atomic, flushed first), then its digest."""
    with open(built, "rb") as f:
        os.fsync(f.fileno())
    digest = _digest(built)
    os.replace(built, target)
    note = built.with_name(built.name + ".sha256")
    note.write_text(digest + "\n")
    os.replace(note, Path(f"{target}.sha256"))


#: Scratch folders in the cache older than this are left by compiles that were killed (a live one
#: is at most its 300 s timeout old).
STALE_SCRATCH_SECONDS = 3600


def _remove_stale_scratch(cache: Path) -> None:
    """Delete the scratch folders a killed compile left in the cache (its ``TemporaryDirectory``
    cleanup never ran: before, each stayed for good). Only what such a folder can be: named as
    ``tempfile`` names them (``ntkgp-`` and 8 characters), not a link, holding nothing but the
    kernel's build outputs (``fused_mlp_*``), an hour old; the cache may be a folder shared with
    other things (``NTKGP_CACHE_DIR``)."""
    cutoff = time.time() - STALE_SCRATCH_SECONDS
    for folder in cache.glob("ntkgp-????????"):
        try:
            if (folder.is_symlink() or not folder.is_dir() or folder.stat().st_mtime >= cutoff
                    or any(not f.name.startswith("fused_mlp_") or not f.is_file() for f in folder.iterdir())):
                continue
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:   # gone meanwhile, or not ours to read
            pass


def _compile(dtype: torch.dtype) -> ctypes.CDLL | str:
    """The kernel for ``dtype``, compiled if not cached; or why it could not be built."""
    try:
        compiler = shlex.split(os.environ.get("CC") or "")   # "ccache gcc", "gcc -std=c11": words, as make reads CC
    except ValueError as error:   # an unbalanced quote
        return f"CC={os.environ.get('CC')!r} cannot be read as a command ({error})"
    if not compiler:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if found is None:
            return "no C compiler found (set CC to one)"
        compiler = [found]
    try:
        source = SOURCE.read_bytes()
    except OSError as error:   # an install without its package data
        return f"the kernel's source is missing ({error})"
    define = ["-DNTKGP_DOUBLE"] if dtype == torch.float64 else []
    cache, errors = _cache_dir(), []
    _remove_stale_scratch(cache)
    machine = (_cpu_signature() + platform.machine()).encode()
    for flags, libs in _FLAG_SETS:
        command = [*compiler, *flags, *define, "-fPIC", "-shared"]
        key = hashlib.sha256(b"\0".join([source, " ".join(command + libs).encode(), machine])).hexdigest()[:20]
        name = f"fused_mlp_{key}.so"
        # built before, and whole: a library without its digest (from before digests, or whose
        # digest was lost) is compiled again, also where the cache is read-only, since loading one
        # cut short killed the process with a bus error
        if _intact(cache / name):
            try:
                return _load(cache / name)
            except OSError as error:
                # whole but unloadable (a library the loader refuses, say): left in place it was skipped
                # by every later process, each falling back to the slower flags below; built again instead
                errors.append(f"loading {cache / name}: {error}")
                try:
                    Path(f"{cache / name}.sha256").unlink(missing_ok=True)
                    (cache / name).unlink(missing_ok=True)
                except OSError as error:   # a read-only cache: built in a scratch folder below
                    errors.append(f"deleting {cache / name}: {error}")
        # built into a private scratch folder, then moved into the cache whole (atomic: a concurrent
        # process sees the whole library or none); without a writable cache, loaded from the scratch
        # folder, which is deleted (never a predictable shared path, where another user could have left
        # a library of their own under the expected name)
        writable = _writable(cache)
        try:
            folder = tempfile.TemporaryDirectory(dir=cache if writable else None, prefix="ntkgp-",
                                                 ignore_cleanup_errors=True)   # Windows: a loaded DLL stays
        except OSError as error:   # no temp folder either: this NotADirectoryError aborted engine="auto"
            errors.append(f"no folder to compile in: {error}")
            continue
        with folder as scratch:
            built = Path(scratch) / name
            try:
                run = subprocess.run([*command, str(SOURCE), "-o", str(built), *libs],
                                     capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(f"{' '.join(command)}: {error}")
                continue
            if run.returncode != 0:
                errors.append(f"{' '.join(command)}: {run.stderr.strip()[-500:]}")
                continue
            try:
                if writable:
                    _store(built, cache / name)
                    built = cache / name
                return _load(built)   # a loaded library stays mapped after its file is deleted
            except OSError as error:   # also a "compiler" that exits 0 without writing the library
                errors.append(f"loading {built}: {error}")
    return "the kernel could not be built or loaded: " + " | ".join(errors)


def library(dtype: torch.dtype) -> ctypes.CDLL | str:
    """The compiled kernel for float32 or float64 (built once per process), or why there is none."""
    with _lock:
        if dtype not in _libraries:
            _libraries[dtype] = _compile(dtype)
        return _libraries[dtype]


def warn_fallback(reason: str, dtype: torch.dtype) -> None:
    """Warn, once per process and dtype, that ``engine="auto"`` trains with the stacked step because
    the kernel could not be built (``reason`` is :func:`library`'s); silent for other reasons (an
    architecture the kernel does not take is no fault)."""
    with _lock:
        # the very string library() keeps: fused_steps passes it on unchanged, its other reasons are new strings
        if _libraries.get(dtype) is not reason or dtype in _warned:
            return
        _warned.add(dtype)
    warnings.warn(f"train_ensemble(engine='auto') trains {dtype} networks with the stacked step (3-4x slower "
                  f"at width 512) since the fused kernel is unavailable: {reason}. Pass engine='stacked' to "
                  "silence this.", RuntimeWarning, stacklevel=caller_stacklevel())


def _flatten(model: nn.Module) -> list[nn.Module]:
    # exact classes: a subclass may override forward, and the kernel would not know
    if type(model) is nn.Sequential:
        return [leaf for child in model for leaf in _flatten(child)]
    return [] if type(model) is nn.Identity else [model]


def _activation(module: nn.Module) -> tuple[int, tuple[float, float, float]] | None:
    fn = getattr(module, "fn", None) if type(module) is ActivationModule else None
    if not isinstance(fn, functools.partial) or fn.args:
        return None
    if fn.func is _erf and set(fn.keywords) == {"a", "b", "c"}:
        return _ACTIVATION_CODES["erf"], (fn.keywords["a"], fn.keywords["b"], fn.keywords["c"])
    if fn.func is _abrelu and set(fn.keywords) == {"a", "b"}:
        return _ACTIVATION_CODES["abrelu"], (fn.keywords["a"], fn.keywords["b"], 0.0)
    return None


class FusedSteps:
    """Gradient-descent steps of an ensemble of MLPs, run by the compiled kernel on the model's own
    weights (updated in place). Build with :func:`fused_steps`, which checks that the kernel
    applies."""

    def __init__(self, lib: ctypes.CDLL, dense: list[DenseModule], activations: list[tuple[int, tuple]],
                 rates: dict, names: dict[int, str], x: Tensor, y: Tensor) -> None:
        dtype = x.dtype
        self.lib, self.dense = lib, dense
        self.members = dense[0].weight.shape[0]
        self.m = x.shape[0]
        self.keep: list[Tensor] = []            # every tensor the kernel reads through a pointer

        def hold(t: Tensor) -> Tensor:
            if t.device.type != "cpu":   # a meta tensor's data_ptr would send the kernel to no memory at all
                raise RuntimeError(f"fused kernel given a tensor on {t.device}")
            self.keep.append(t)
            return t

        self.x, self.y = hold(x.contiguous()), hold(y.contiguous())
        self.dims = hold(torch.tensor([dense[0].in_features] + [d.out_features for d in dense], dtype=torch.int64,
                                      device="cpu"))
        per_row = []
        for d in dense:
            rate = torch.as_tensor(rates[f"{names[id(d)]}weight"], dtype=dtype, device="cpu").reshape(-1)
            per_row.append(hold(rate.expand(cast(int, d.in_features)).contiguous()))   # drawn: not None
        scales = [None if d.input_scale is None
                  else hold(d.input_scale.detach().to(dtype).reshape(-1).expand(cast(int, d.in_features)).contiguous())
                  for d in dense]
        self.scales = self._pointers(scales)
        self.rates = self._pointers(per_row)
        cpu: dict[str, Any] = dict(device="cpu")   # explicit: a caller's `with torch.device(...)` must not move these
        self.bias_scale = hold(torch.tensor([float(d.bias_scale) if d.bias is not None else 0.0 for d in dense],
                                            dtype=dtype, **cpu))
        self.bias_rate = hold(torch.tensor([float(rates[f"{names[id(d)]}bias"]) if d.bias is not None else 0.0
                                            for d in dense], dtype=dtype, **cpu))
        self.codes = hold(torch.tensor([code for code, _ in activations] or [0], dtype=torch.int64, **cpu))
        self.params = hold(torch.tensor([p for _, ps in activations for p in ps] or [0.0], dtype=torch.float64,
                                        **cpu))
        work = lib.ntkgp_work_size(len(dense), self.dims.data_ptr(), self.m)
        threads = max(1, min(torch.get_num_threads(), self.members))
        bounds = [self.members * t // threads for t in range(threads + 1)]
        self.ranges = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        self.work = [hold(torch.empty(work, dtype=dtype, **cpu)) for _ in self.ranges]
        self.limit = hold(torch.empty(self.members, dtype=torch.float64, **cpu))
        self.diverged = hold(torch.empty(self.members, dtype=torch.int64, **cpu))
        self.segment = 1   # steps per call, adapted to _CALL_SECONDS
        self.pool: ThreadPoolExecutor | None = None

    @staticmethod
    def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
        return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])

    def _run(self, index: int, steps: int, check_first: bool) -> None:
        lo, hi = self.ranges[index]
        weights = self._pointers([d.weight.detach()[lo:] for d in self.dense])
        biases = self._pointers([None if d.bias is None else d.bias.detach()[lo:] for d in self.dense])
        self.lib.ntkgp_train(hi - lo, len(self.dense), self.dims.data_ptr(), weights, biases, self.scales,
                             self.bias_scale.data_ptr(), self.rates, self.bias_rate.data_ptr(),
                             self.codes.data_ptr(), self.params.data_ptr(), self.x.data_ptr(), self.y.data_ptr(),
                             self.m, steps, self.limit[lo:].data_ptr(), int(check_first),
                             self.diverged[lo:].data_ptr(), self.work[index].data_ptr())

    def advance(self, steps: int, limit: Tensor, bar: Any = None) -> tuple[int, bool]:
        """Run ``steps`` steps, the first one's loss already checked by the caller; every later
        step's loss is checked against ``limit`` (per member) before its update.

        ``bar``: a tqdm progress bar advanced by the steps done, or ``None``.

        Returns ``(steps done, diverged)``: with ``diverged``, the step after those done failed the
        check for some member (later steps of that member were not taken; other members ran on).
        """
        self.limit.copy_(limit.detach().to(torch.float64).cpu())
        if self.pool is None and len(self.ranges) > 1:   # kept for every record: starting threads costs
            self.pool = ThreadPoolExecutor(len(self.ranges))
        done = 0
        while done < steps:
            count = min(self.segment, steps - done)
            start = time.perf_counter()
            if self.pool is None:
                self._run(0, count, done > 0)
            else:
                list(self.pool.map(self._run, range(len(self.ranges)), [count] * len(self.ranges),
                                   [done > 0] * len(self.ranges)))
            elapsed = time.perf_counter() - start
            failed = self.diverged[self.diverged >= 0]
            if failed.numel():
                reached = int(failed.min())
                if bar is not None:
                    bar.update(reached)
                return done + reached, True
            done += count
            if bar is not None:
                bar.update(count)
            self.segment = max(1, min(1 << 20, int(count * _CALL_SECONDS / max(elapsed, 1e-6))))
        return done, False

    def close(self) -> None:
        """Stop the worker threads (after the call in progress, if any)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def forward_hooks(module: nn.Module) -> str | None:
    """What runs besides the modules' own ``forward`` methods when ``module`` is called: the name of
    the first submodule (``module`` included) with forward hooks or pre-hooks, ``"every module"``
    for torch's global ones, or ``None``."""
    if getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
            nn.modules.module, "_global_forward_pre_hooks", None):
        return "every module"
    return next((type(m).__name__ for m in module.modules() if m._forward_hooks or m._forward_pre_hooks), None)


def fused_steps(model: nn.Module, trained: list[str], rates: dict, x: Tensor, y: Tensor) -> FusedSteps | str:
    """A :class:`FusedSteps` for ``model``, or the reason the kernel does not apply to it."""
    found = fused_layers(model, trained, x)
    if isinstance(found, str):
        return found
    dense, activations, lib = found
    prefixes = {id(m): f"{p}." if p else "" for p, m in model.named_modules()}
    return FusedSteps(lib, dense, activations, rates, prefixes, x, y)


def fused_layers(model: nn.Module, trained: list[str], x: Tensor
                 ) -> tuple[list[DenseModule], list[tuple[int, tuple]], ctypes.CDLL] | str:
    """``(Dense layers, activations between them, compiled kernel)`` of a stacked ``model`` (an ensemble,
    one member included) whose ``trained`` parameters the kernel can train on inputs like ``x``, or the
    reason it cannot: :func:`train_ensemble` asks this of one member before any chunk is drawn, so that
    ``engine="fused"`` is refused before the chunk's weights are (1.1 s at width 2000, 16 members)."""
    if x.device.type != "cpu":
        return f"it runs on the CPU (the ensemble is on {x.device})"
    if x.dtype not in (torch.float32, torch.float64):
        return f"it is compiled for float32 and float64 (not {x.dtype})"
    names = [n for n, _ in model.named_parameters()]
    if set(trained) != set(names):
        return TRAINS_EVERY_PARAMETER
    # what the kernel computes is the modules' own forward methods: anything that changes them is refused
    hooked = forward_hooks(model)
    if hooked is not None:
        return f"it cannot run forward hooks (on {hooked})"
    leaves = _flatten(model)
    dense: list[DenseModule] = []
    activations: list[tuple[int, tuple]] = []
    pending = None
    for leaf in leaves:
        if type(leaf) is DenseModule:
            if dense:
                activations.append(pending or (_ACTIVATION_CODES["identity"], (1.0, 1.0, 0.0)))
            elif pending is not None:
                return "the network starts with an activation"
            dense.append(leaf)
            pending = None
        elif pending is None and _activation(leaf) is not None:
            pending = _activation(leaf)
        else:
            what = getattr(leaf, "name", None) or type(leaf).__name__
            return f"it takes Dense layers with one erf or ReLU-type activation between them (not {what})"
    if not dense or pending is not None:
        return "the network must end in a Dense layer"
    if len(dense) > 64:
        return "it takes at most 64 Dense layers"
    # every parameter a Dense layer's own, in storage of its own: the kernel updates each once per step
    own = [p for d in dense for p in (d.weight, d.bias) if p is not None]
    parameters = {id(p) for p in model.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in own}
    if len({id(d) for d in dense}) < len(dense) or len(parameters) != len(own) or \
            any(id(p) not in parameters for p in own) or len(storages) < len(own):
        return "it needs each Dense layer used once, with weights and biases of its own that are trained parameters"
    members = dense[0].weight.shape[0] if dense[0].weight is not None else None
    for d in dense:
        if d.weight is None or d.weight.dim() != 3 or not d.weight.is_contiguous() or d.weight.shape[0] != members:
            return "it needs the stacked (E, in, out) weights of an ensemble"
        if d.bias is not None and (not d.bias.is_contiguous() or d.bias.shape != (members, 1, d.out_features)):
            return "it needs the stacked (E, 1, out) biases of an ensemble"
        if any(p.dtype != x.dtype or p.device.type != "cpu" for p in d.parameters()):
            return "the weights must be on the CPU in the inputs' dtype"
    lib = library(x.dtype)
    if isinstance(lib, str):
        return lib
    return dense, activations, lib

