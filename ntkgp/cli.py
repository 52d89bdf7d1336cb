"""The ``ntkgp`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


def demo(args: argparse.Namespace) -> int:
    """Print the analytic NNGP/NTK of a small network next to finite-width Monte-Carlo estimates."""
    import ntkgp
    from ntkgp._checks import integer_at_least, seed_value
    from ntkgp.finite import monte_carlo_kernel

    try:
        integer_at_least(args.width, 1, "--width")
        integer_at_least(args.samples, 1, "--samples")
        seed_value(args.seed, name="--seed")   # torch.manual_seed below failed with "Overflow when unpacking long"
    except ValueError as error:
        print(f"ntkgp demo: error: {error}", file=sys.stderr)
        return 2
    # a generator of its own (the same draws as the global one seeded alike): main() also runs in-process,
    # where reseeding torch's global generator changed the caller's random stream
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    net = ntkgp.serial(
        ntkgp.Dense(args.width, weight_var=2.25, bias_var=0.01), ntkgp.ReLU(),
        ntkgp.Dense(args.width, weight_var=2.25, bias_var=0.01), ntkgp.Erf(),
        ntkgp.Dense(16, weight_var=2.25, bias_var=0.01),
    )
    print(f"network: Dense({args.width}) -> ReLU -> Dense({args.width}) -> Erf -> Dense(16), "
          "weight_var=2.25, bias_var=0.01, NTK parameterization")
    print("kernels are per output unit, so each network contributes 16 draws to the averages")
    print(f"inputs: 5 points in R^3 (seed {args.seed}); Monte Carlo over {args.samples} random networks\n")
    with torch.no_grad():
        exact = net.kernel(x)
    try:
        estimate = monte_carlo_kernel(net, x, n_samples=args.samples, seed=args.seed)
    except ValueError as error:   # its batches' seeds (seed + 1_000_003 b), checked before any network is drawn
        print(f"ntkgp demo: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as error:
        # a --width whose weights cannot be allocated was a traceback; as compare's, status 1
        from ntkgp.compare.harness import _stop_reason

        reason = ("out of memory while drawing the networks" if isinstance(error, MemoryError) else
                  _stop_reason(error, f"drawing networks of width {args.width}", "a smaller --width"))
        if reason is None:
            raise
        print(f"ntkgp demo: error: {reason}", file=sys.stderr)
        return 1
    # restored afterwards: an in-process caller's tensors printed with 4 digits and no exponents
    saved = {k: getattr(torch._tensor_str.PRINT_OPTS, k)
             for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)
    try:
        for name in ("nngp", "ntk"):
            a, b = getattr(exact, name), getattr(estimate, name)
            print(f"{name.upper()} (infinite width):\n{a}\n{name.upper()} (Monte Carlo, width {args.width}):\n{b}")
            print(f"relative Frobenius difference: {float((a - b).norm() / a.norm()):.4f}\n")
    finally:
        torch.set_printoptions(**saved)
    return 0


#: Presets of ``ntkgp compare``; explicit options override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"widths": (32, 128, 512), "ensemble_size": 64, "record_steps": (0, 10, 100, 1000)},
    "acceptance": {"widths": (128, 256, 512, 1024, 2048), "ensemble_size": 128, "record_steps": (0, 10, 100, 1000)},
    "gpu": {"widths": (256, 512, 1024, 2048, 4096, 8192), "ensemble_size": 1024,
            "record_steps": (0, 10, 100, 1000, 10000)},
}


def _listed(values: tuple[int, ...]) -> str:
    return " ".join(map(str, values))


#: CompareConfig fields named in its error messages, and the options that set them.
OPTIONS = {"ensemble_size": "--ensemble-size", "record_steps": "--steps", "weight_var": "--weight-var",
           "bias_var": "--bias-var", "learning_rate": "--learning-rate", "lr_fraction": "--lr-fraction",
           "chunk_size": "--chunk-size"}


def _options(text: object, spec: bool = False) -> str:
    """``text`` (an error, a check or a note) with the config's field names replaced by the options a user
    typed; with a ``spec`` not the MLP's (``weight_var`` in an error is then the spec's own layer argument)."""
    from ntkgp.compare.harness import MLP_FIELDS

    message = str(text)
    for field, option in OPTIONS.items():
        if spec and field in MLP_FIELDS:
            continue
        message = re.sub(rf"(?<![\w/.-]){field}(?![\w/.-])", option, message)   # not inside a path
    return message


#: CompareConfig fields that are also words of other messages ("widths [16] are reported but not
#: checked", "the seed of the last chunk"): named as options only where an error begins with one, as
#: the config's checks word them ("widths must be ...", "seed + 1_000_003 * 3 (...) must be below 2**64").
LEADING_OPTIONS = {"widths": "--widths", "depth": "--depth", "seed": "--seed", "spec": "--spec"}

#: Python advice in the errors of the config and its layers, and what a CLI user types instead.
DTYPE_ADVICE = (("dtype='float64'", "--dtype float64"), ("(dtype=torch.float64)", "(--dtype float64)"))
#: The same for the MLP's options, which do not apply with a spec (whose layers take Python arguments).
MLP_ADVICE = (("Unknown activation ", "Unknown --activation "), (" or pass a layer.", "."))


def _error(error: BaseException, spec: bool = False) -> str:
    """An error raised for the CLI's settings or data, naming the options a user typed rather than
    the config's fields and its Python advice (``_options``, and the fields of ``LEADING_OPTIONS``)."""
    from ntkgp.compare.harness import MLP_FIELDS

    message = str(error)
    for field, option in LEADING_OPTIONS.items():
        if not (spec and field in MLP_FIELDS):
            message = re.sub(rf"^{field}(?= )", option, message)   # "spec(8) has 2 outputs" names a call: kept
    for python, cli in DTYPE_ADVICE + (() if spec else MLP_ADVICE):
        message = message.replace(python, cli)
    return _options(message, spec)


@contextlib.contextmanager
def _folders_importable(spec: str | None) -> Iterator[None]:
    """The current folder on ``sys.path`` while the block runs, as ``python -m ntkgp`` has it for the
    whole process and the ``ntkgp`` script does not: a ``--spec MODULE:FUNCTION`` (and what the
    function imports when it is called) is found the same way under both. A ``--spec FILE.py:FUNCTION``
    puts the file's folder first, as ``python FILE.py`` does: the file imports its neighbours. Both stay
    for the whole comparison, not the import alone, since the spec is called (and may import) while the
    networks are built; they are removed afterwards, so no later import finds the user's files."""
    folders = [os.getcwd()] if "" not in sys.path else []
    file = _spec_file(spec) if spec is not None else None
    if file is not None:
        folders.insert(0, str(file.resolve().parent))
    added = [folder for folder in dict.fromkeys(folders) if folder not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def compare(args: argparse.Namespace) -> int:
    """Train finite ensembles, compare them with the infinite-width predictions, write a report."""
    with _folders_importable(args.spec):
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    from ntkgp.compare import CompareConfig, load_dataset, run_comparison, write_report
    from ntkgp.compare.harness import INTERRUPTED, check_details
    from ntkgp.compare.report import check_notes

    settings = dict(PRESETS[args.preset])
    for key in ("widths", "ensemble_size", "record_steps", "depth", "activation", "weight_var", "bias_var",
                "parameterization", "learning_rate", "lr_fraction", "seed", "dtype", "chunk_size"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    if args.no_bias:
        settings["bias_var"] = None
    device = None if args.device == "auto" else args.device
    spec = args.spec is not None
    try:  # bad settings and files get one line, not a traceback, before any training
        if spec:
            mlp_options = {"--depth": args.depth, "--activation": args.activation, "--weight-var": args.weight_var,
                           "--bias-var": args.bias_var, "--no-bias": args.no_bias or None,
                           "--parameterization": args.parameterization}
            given = [option for option, value in mlp_options.items() if value is not None]
            if given:
                raise ValueError(f"--spec replaces {', '.join(mlp_options)}: the spec sets its own layers "
                                 f"(got {', '.join(given)}).")
            settings["spec"] = load_spec(args.spec)
        config = CompareConfig(**settings, readout_only=args.readout_only, device=device,
                               divergence_check=not args.no_divergence_check, progress=not args.no_progress)
        data = load_dataset(args.dataset)
        created = _writable_folder(args.out)
    except ValueError as error:
        print(f"ntkgp compare: error: {_error(error, spec)}", file=sys.stderr)
        return 2
    print(f"ntkgp compare: {data.description}; widths {list(config.widths)}, {config.ensemble_size} members, "
          f"steps {list(config.record_steps)}, {'readout only' if config.readout_only else 'all layers'}", flush=True)
    try:  # run_comparison checks the data against the spec (a zero training kernel) before training
        result = run_comparison(data, config)
    except BaseException as error:
        # no report: the folders made for it (--out and any parents it needed) stayed behind, empty
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, KeyboardInterrupt):   # during the first width: nothing to report
            print("ntkgp compare: interrupted", file=sys.stderr)
            return 130
        if not isinstance(error, ValueError | MemoryError):
            raise
        print(f"ntkgp compare: error: {_error(error, spec)}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1   # MemoryError: the first width did not fit
    try:
        out = write_report(result, args.out)
    except KeyboardInterrupt:   # write_report moves the files in only once all are written
        print(f"ntkgp compare: interrupted while writing the report; {args.out} keeps what it held (unless the "
              "interruption came while the finished files were being moved in)", file=sys.stderr)
        return 130
    # 3 significant digits, as report.md: ".2f" printed 0.004 as 0.00
    print(f"learning rate {result.learning_rate:.4g} (= {result.learning_rate / result.max_learning_rate:.3g} "
          f"x 2m/lambda_max); {result.seconds:.0f} s")
    details = check_details(result)
    for name, ok in result.checks.items():
        detail = f" ({details[name]})" if name in details else ""
        print(f"  {'PASS' if ok else 'FAIL'}  {_options(name, spec)}{detail}")
    for note in check_notes(result):
        print(f"  NOTE  {_options(note, spec)}")
    print(f"report: {out / 'report.md'}")
    if result.stopped is not None:   # a report of the widths before it, but not the run that was asked for
        return 130 if result.stopped.startswith(INTERRUPTED) else 1
    return 1 if args.check and not all(result.checks.values()) else 0


def _writable_folder(path: str) -> list[pathlib.Path]:
    """Create the report folder now, so that a bad ``--out`` fails before hours of training; the
    folders this created (``path`` and the parents it needed), innermost first."""
    import tempfile

    from ntkgp.compare.report import check_report_folder

    check_report_folder(path)   # empty, a file, or a folder named report.json or loss.png in it
    folder = pathlib.Path(path)
    created = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"cannot write the report to {path!r}: {error.strerror or error}") from None
    for name in ("report.json", "report.md"):   # an earlier report's files that cannot be replaced
        if (folder / name).exists() and not os.access(folder / name, os.W_OK):
            raise ValueError(f"cannot write the report to {path!r}: {name} there is not writable")
    return created


def load_spec(text: str) -> Callable[..., Any]:
    """The function named by ``--spec``: ``FILE.py:NAME`` (a Python file, run as a module of its own) or
    ``MODULE:NAME`` (an importable module); ``ValueError`` for a name that does not resolve. The file's
    neighbours are importable under :func:`compare` (see :func:`_folders_importable`). The function is
    returned as found, callable but unchecked: :class:`~ntkgp.compare.CompareConfig` checks that it
    takes a width and gives a spec."""
    import importlib
    import importlib.util

    where, colon, name = text.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise ValueError(f"--spec must be FILE.py:FUNCTION or MODULE:FUNCTION, got {text!r}.")
    path = _spec_file(text)
    if path is not None:
        if not path.is_file():
            raise ValueError(f"--spec: no file {where!r}.")
        found = importlib.util.spec_from_file_location(f"_ntkgp_spec_{path.stem}", path)
        if found is None or found.loader is None:
            # no loader for a name without the .py suffix (a path such as dir/spec:make): None, and
            # module_from_spec's AttributeError "'NoneType' object has no attribute 'loader'"
            raise ValueError(f"--spec: {where!r} is not a Python file (it needs the .py suffix).")
        module = importlib.util.module_from_spec(found)
        # in sys.modules while it runs, as an import (and python FILE.py, as __main__) has it: a dataclass
        # in the file under `from __future__ import annotations` looks its module up there, and raised
        # "AttributeError: 'NoneType' object has no attribute '__dict__'" from dataclasses, a traceback
        sys.modules[found.name] = module
        try:
            found.loader.exec_module(module)   # errors in the user's file keep their traceback
        except BaseException:
            sys.modules.pop(found.name, None)   # as a failed import leaves no module behind
            raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            if error.name is None or not where.startswith(error.name):
                raise       # the module exists but imports something missing: its own traceback
            raise ValueError(f"--spec: no module {where!r} (a file needs its .py suffix or a path).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--spec: {where} has no function {name!r}.")
    return function


def _spec_file(text: str) -> pathlib.Path | None:
    """The Python file a ``--spec`` names (``FILE.py:NAME``, or a path), or ``None`` for a module name."""
    where = text.rpartition(":")[0]
    return pathlib.Path(where) if where.endswith(".py") or os.sep in where or "/" in where else None


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train finite-width ensembles and compare them with the infinite-width predictions",
        description="Train ensembles of finite networks built from one spec at several widths by full-batch "
                    "gradient descent, and compare them at chosen steps with the exact NTK-GP (or NNGP, "
                    "readout-only) predictions. Writes report.json, report.md and PNG figures.",
        epilog="presets: " + "; ".join(f"{k}: widths {list(v['widths'])}, {v['ensemble_size']} members, "
                                        f"steps {list(v['record_steps'])}" for k, v in PRESETS.items()))
    p.add_argument("--dataset", default="sin",
                   help="'sin' (5 noisy samples of sin on [-pi, pi], 50 test points; default), 'circle' "
                        "(points on the unit circle), a .csv file of numbers (one training point per row: "
                        "inputs..., then its one target; a header line must start with '#'; test points: a "
                        "grid over a 1-D input, else the training inputs) or a .npz file (arrays x_train (N, d), "
                        "y_train, x_test (M, d), optionally y_test for the figures; a 1-D array holds one "
                        "value per point)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="sizes: 'default' (< 2 min on a 2-core CPU), 'acceptance' (widths 128-2048, 128 "
                        "members: the full validation, ~6 min on a 2-core CPU), 'gpu' (widths to 8192, 1024 members)")
    p.add_argument("--widths", type=int, nargs="+",
                   help="hidden widths to train, in any order (sorted, repeats dropped; default: the preset's, "
                        f"{_listed(PRESETS['default']['widths'])} for 'default')")
    p.add_argument("--ensemble-size", type=int,
                   help=f"members per width, at least 2 (default: the preset's, {PRESETS['default']['ensemble_size']} "
                        "for 'default')")
    p.add_argument("--steps", dest="record_steps", type=int, nargs="+",
                   help="gradient-descent steps s at which to compare, in any order (sorted, repeats dropped; "
                        "reported with the time t = learning rate x s: ntkgp.predict's t at its default "
                        f"learning_rate=1; default: the preset's, {_listed(PRESETS['default']['record_steps'])} "
                        "for 'default')")
    p.add_argument("--spec", metavar="FILE.py:FUNCTION",
                   help="any architecture instead of the MLP: a Python function of the hidden width that "
                        "returns an ntkgp network spec, as FILE.py:FUNCTION or MODULE:FUNCTION (e.g. "
                        "nets.py:resnet, with def resnet(n): return ntkgp.serial(...)); it replaces --depth, "
                        "--activation, --weight-var, --bias-var, --no-bias and --parameterization")
    p.add_argument("--depth", type=int, help="hidden layers, at least 1 (default 2)")
    p.add_argument("--activation", help="activation name: erf (default), relu, gelu, sin, ...")
    p.add_argument("--weight-var", type=float, help="weight variance of every layer (default 2.25)")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--bias-var", type=float, help="bias variance of every layer (default 0.0025)")
    bias.add_argument("--no-bias", action="store_true", help="layers without biases")
    p.add_argument("--parameterization", choices=["ntk", "standard"],
                   help="ntk (default) or standard (trained with the equivalent per-layer learning rates)")
    p.add_argument("--readout-only", action="store_true",
                   help="train only the last layer and compare with the NNGP gradient-flow predictions")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--learning-rate", type=float,
                      help="absolute learning rate (default: --lr-fraction of 2m/lambda_max)")
    rate.add_argument("--lr-fraction", type=float,
                      help="learning rate as a fraction of the stability limit (default 0.5)")
    p.add_argument("--seed", type=int, help="seed of the initializations (default 0)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["float32", "float64"], help="precision of the finite networks (default float32)")
    p.add_argument("--chunk-size", type=int,
                   help="members trained at once (default: as many as fit in 1 GiB counted in float32, 2 GiB in "
                        "float64, so that the members a seed draws do not depend on --dtype)")
    p.add_argument("--out", default="reports/compare", help="report folder (default reports/compare)")
    p.add_argument("--no-divergence-check", action="store_true", help="skip the run above the stability limit")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, and no line on stderr as each width finishes")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 if an acceptance check fails (the point-wise ones apply at widths >= 256)")
    p.set_defaults(func=compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkgp`` parser with its ``compare`` and ``demo`` subcommands."""
    parser = argparse.ArgumentParser(prog="ntkgp", description="Infinite-width neural networks for PyTorch.")
    # the versions a bug report needs: the kernels' numbers depend on torch's too
    import gpytorch

    from ntkgp import __version__
    parser.add_argument("--version", action="version", help="print the versions of ntkgp, torch and gpytorch",
                        version=f"ntkgp {__version__} (torch {torch.__version__}, gpytorch {gpytorch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compare(sub)
    p = sub.add_parser("demo", help="analytic NNGP/NTK of a small network vs a finite-width Monte-Carlo estimate")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the finite networks (default 1024)")
    p.add_argument("--samples", type=int, default=256, help="number of random networks (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the networks (default 0)")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ntkgp compare`` or ``ntkgp demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    # warnings as one line each ("RuntimeWarning: ..."), without the library source line under them
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"
    try:
        return args.func(args)
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
