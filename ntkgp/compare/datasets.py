"""Datasets for comparing finite ensembles with infinite-width predictions."""

from __future__ import annotations

import codecs
import dataclasses
import math
import os
import pathlib
import re
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ntkgp._checks import integer_at_least, seed_value
from ntkgp.layers.validation import all_finite, finite_number


@dataclass(frozen=True)
class Dataset:
    """Training and test inputs (``(N, d)``, ``(M, d)``) and training targets ``(N, 1)`` (float64);
    optional test targets ``(M, 1)``, drawn in the report's band figures. The built-in and loaded
    datasets are on the CPU, whatever torch's default device (the comparison moves them)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
                raise ValueError(f"{name} must be a real tensor, got "
                                 f"{value.dtype if isinstance(value, Tensor) else type(value).__name__}.")
            # float64 on the CPU as documented: float32 data made the analytic side of a comparison
            # float32, and CUDA data put it on the GPU, next to the trainer's CPU records (a failed subtraction)
            object.__setattr__(self, name, value.to(device="cpu", dtype=torch.float64))
            # as load_dataset refuses them: a NaN test input surfaced in run_comparison as inputs "too
            # large" for float64, and a NaN in y_test went silently into the figures
            if not all_finite(getattr(self, name)):
                raise ValueError(f"{name} contains NaN or infinite values.")
        # the comparison trains one-output networks: several target columns would broadcast
        # against them and train towards their row means without any error
        for name in ("x_train", "y_train", "x_test"):
            if getattr(self, name).dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(getattr(self, name).shape)}.")
        if self.x_train.shape[1] == 0:   # failed later as "in_features must be a positive integer, got 0"
            raise ValueError(f"x_train must have at least one input feature (column), got shape "
                             f"{tuple(self.x_train.shape)}.")
        if self.y_train.shape[-1] != 1:
            raise ValueError(f"y_train must have one target column, got shape {tuple(self.y_train.shape)}.")
        if self.x_train.shape[0] == 0 or self.x_test.shape[0] == 0:
            raise ValueError(f"A dataset needs at least one training and one test point, got "
                             f"{self.x_train.shape[0]} and {self.x_test.shape[0]}.")
        # each names the pair that differs: all three shapes, unnamed, left the reader to find it
        if self.x_train.shape[0] != self.y_train.shape[0]:
            raise ValueError(f"x_train and y_train must have one row per training point, got "
                             f"{self.x_train.shape[0]} and {self.y_train.shape[0]} rows.")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"x_test must have the {self.x_train.shape[1]} input features (columns) of x_train, "
                             f"got {self.x_test.shape[1]}.")
        if self.y_test is not None and self.y_test.shape != (self.x_test.shape[0], 1):
            raise ValueError(f"y_test must hold one target per test point, shape {(self.x_test.shape[0], 1)}, "
                             f"got {tuple(self.y_test.shape)}.")

    @property
    def plot_coordinate(self) -> Tensor:
        """A 1-D coordinate of the test points for plots (the input, or the angle on a circle)."""
        return plot_coordinate(self.x_test, on_a_circle(self.x_train, self.x_test))


def on_a_circle(*points: Tensor) -> bool:
    """Whether ``(n, 2)`` point sets lie on one circle about the origin (norms within 1 % of each
    other), where the angle orders the points; elsewhere points of one angle and different radii
    (a grid) fell on one abscissa of the band figures."""
    if any(x.shape[-1] != 2 for x in points):
        return False
    radii = torch.cat([x.norm(dim=-1) for x in points])
    return radii.numel() > 0 and bool(radii.min() > 0) and bool(radii.max() <= 1.01 * radii.min())


def plot_label(x: Tensor, circle: bool | None = None) -> str:
    """What :func:`plot_coordinate` of ``(n, d)`` points shows, for an axis label."""
    if x.shape[-1] == 2 and (on_a_circle(x) if circle is None else circle):
        return "angle atan2(x₂, x₁)"
    return "x" if x.shape[-1] == 1 else "test point index"


def plot_coordinate(x: Tensor, circle: bool | None = None) -> Tensor:
    """A 1-D coordinate of ``(n, d)`` points for plots: the input, the angle of 2-D points on a circle
    (``circle``; ``None``: :func:`on_a_circle` of ``x``), or the index."""
    if x.shape[-1] == 1:
        return x[:, 0]
    if x.shape[-1] == 2 and (on_a_circle(x) if circle is None else circle):
        return torch.atan2(x[:, 1], x[:, 0])
    return torch.arange(x.shape[0], dtype=x.dtype, device=x.device)


def sin_dataset(seed: int = 0, noise: float = 0.1) -> Dataset:
    """5 noisy samples of ``sin`` on ``[−π, π]``, 50 test points: neural-tangents' classic demo."""
    # numpy and 0-d tensor numbers too, as the rest of the package takes them: np.float32(0.1) was
    # refused as "noise must be a finite non-negative number, got np.float32(0.1)"
    kind = "a finite non-negative number"
    noise = finite_number(noise, "noise", kind)
    if noise < 0:
        raise ValueError(f"noise must be {kind}, got {noise!r}.")
    # torch's manual_seed raised "Overflow when unpacking long long" for 2**64 and a RuntimeError for 1.5
    g = torch.Generator().manual_seed(seed_value(seed))
    x_train = torch.linspace(-math.pi, math.pi, 5, dtype=torch.float64, device="cpu").unsqueeze(-1)
    y_train = torch.sin(x_train) + noise * torch.randn(x_train.shape, generator=g, dtype=torch.float64,
                                                         device="cpu")
    x_test = torch.linspace(-math.pi, math.pi, 50, dtype=torch.float64, device="cpu").unsqueeze(-1)
    return Dataset("sin", x_train, y_train, x_test, torch.sin(x_test),
                   f"5 noisy samples (noise {noise:.12g}) of sin on [-pi, pi], 50 test points")


def circle_dataset(n_train: int = 8, n_test: int = 100) -> Dataset:
    """Points on the unit circle (Jacot et al. 2018, Fig. 1): the kernel depends on the angle only."""
    n_train, n_test = integer_at_least(n_train, 1, "n_train"), integer_at_least(n_test, 1, "n_test")
    gamma = torch.linspace(-math.pi, math.pi, n_train + 1, dtype=torch.float64, device="cpu")[:-1] + 0.3
    x_train = torch.stack([torch.cos(gamma), torch.sin(gamma)], -1)
    y_train = (torch.sin(gamma) + 0.5 * torch.cos(2 * gamma)).unsqueeze(-1)
    phi = torch.linspace(-math.pi, math.pi, n_test, dtype=torch.float64, device="cpu")
    x_test = torch.stack([torch.cos(phi), torch.sin(phi)], -1)
    y_test = (torch.sin(phi) + 0.5 * torch.cos(2 * phi)).unsqueeze(-1)
    return Dataset("circle", x_train, y_train, x_test, y_test,
                   f"{n_train} points on the unit circle, target sin(g) + cos(2g)/2, {n_test} test points")


def load_dataset(source: str | os.PathLike) -> Dataset:
    """A built-in dataset (``"sin"``, ``"circle"``) or a file.

    * ``.npz`` with integer or floating-point arrays ``x_train`` ``(N, d)``, ``y_train`` (one target), ``x_test``
      ``(M, d)`` (and optionally ``y_test``, drawn in the figures); 1-D arrays hold one value per
      point (``x`` of shape ``(N,)`` is ``N`` points of one input);
    * ``.csv`` (comma-separated numbers without quotes, UTF-8 with or without a byte-order mark; a header
      line must start with ``#``, after spaces if any): every row a training point, the last column its
      one target; the test points are a grid of 100 over the range of a 1-D input widened by 10 % on
      each side (to show extrapolation), or the training inputs themselves otherwise.
    """
    if not isinstance(source, str | os.PathLike):   # None: a TypeError from pathlib
        raise ValueError(f"source must be 'sin', 'circle' or a path to a .csv/.npz file, got {source!r}.")
    source = os.fspath(source)
    if source == "sin":
        return sin_dataset()
    if source == "circle":
        return circle_dataset()
    if not source:   # pathlib reads "" as ".", the current folder: "'' is a directory"
        raise ValueError(f"Unknown dataset {source!r}: use 'sin', 'circle' or a path to a .csv/.npz file.")
    path = pathlib.Path(source)
    suffix = path.suffix.lower()   # DATA.CSV from Windows, where file names ignore case
    if not path.exists():
        if suffix in (".csv", ".npz"):
            raise ValueError(f"Dataset file {source!r} does not exist.")
        raise ValueError(f"Unknown dataset {source!r}: use 'sin', 'circle' or a path to a .csv/.npz file.")
    if path.is_dir():   # read_bytes said "Is a directory" under a hint about header lines
        raise ValueError(f"Dataset {source!r} is a directory, not a .csv or .npz file.")
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not an .npz archive (numpy.savez writes one).")
        try:
            data = np.load(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read {path} as an .npz archive: {error}") from None
        with data:   # closed when read (or refused), not left to the garbage collector's ResourceWarning
            missing = {"x_train", "y_train", "x_test"} - set(data.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}; it holds {sorted(data.files)}.")
            arrays = {k: _real_array(data, k, path) for k in ("x_train", "y_train", "x_test", "y_test")
                      if k in data.files}
        x_train, x_test = _as_2d(arrays["x_train"]), _as_2d(arrays["x_test"])
        y_train = _as_2d(arrays["y_train"])
        y_test = _as_2d(arrays["y_test"]) if "y_test" in arrays else None
        flat = [k for k in ("x_train", "x_test") if arrays[k].dim() == 1]
        tests = ""
    elif suffix == ".csv":
        table = _read_csv(path)
        if table.size == 0:   # an empty file or comments only (np.loadtxt returns shape (0, 1))
            raise ValueError(f"{path} has no data rows (every line is empty or a '#' comment).")
        if table.shape[1] < 2:
            raise ValueError(f"{path} needs at least two columns (inputs..., target).")
        x_train = torch.as_tensor(table[:, :-1], dtype=torch.float64, device="cpu")
        y_train = torch.as_tensor(table[:, -1:], dtype=torch.float64, device="cpu")
        if x_train.shape[1] == 1:
            lo, hi = float(x_train.min()), float(x_train.max())
            pad = 0.1 * (hi - lo or 1.0)
            x_test = torch.linspace(lo - pad, hi + pad, 100, dtype=torch.float64, device="cpu").unsqueeze(-1)
            # finite inputs whose grid overflows: the check below blamed "x_test in FILE", which the file lacks
            if all_finite(x_train) and not all_finite(x_test):
                raise ValueError(f"{path}: the inputs span [{lo:.3g}, {hi:.3g}], too wide a range for the test "
                                 "grid (100 points over it widened by 10 % on each side overflow float64): "
                                 "rescale the inputs.")
        else:
            x_test = x_train.clone()
        y_test = None
        flat = []
        tests = " (a grid over the input)" if x_train.shape[1] == 1 else " (the training inputs)"
    else:
        raise ValueError(f"Unsupported file type {path.suffix!r}; use .csv or .npz.")
    for name, t in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        if t is not None and not all_finite(t):
            raise ValueError(f"{name} in {path} contains NaN or infinite values.")
    try:
        dataset = Dataset(path.stem, x_train, y_train, x_test, y_test)
    except ValueError as error:
        # the shapes in the message are after reshaping: say how a 1-D array was read, where reading
        # it as one point instead would have made the shapes consistent (elsewhere it is not the cause)
        hint = "".join(f" ({k} was 1-D, shape {tuple(arrays[k].shape)}, read as {arrays[k].shape[0]} points of one "
                       f"input; one point in R^d needs shape (1, d))" for k in _misread(arrays, flat))
        raise ValueError(f"{path}: {error}{hint}") from None
    # the sizes, as the built-in datasets' descriptions give them (the CLI's first line, the report)
    n, m, d = dataset.x_train.shape[0], dataset.x_test.shape[0], dataset.x_train.shape[1]
    return dataclasses.replace(dataset, description=f"{_count(n, 'training point')} of {_count(d, 'input')}, "
                                                 f"{_count(m, 'test point')}{tests} from {path}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _misread(arrays: dict[str, Tensor], flat: list[str]) -> list[str]:
    """The 1-D x arrays of ``flat`` whose reading as one point, ``(1, d)``, makes the dataset's shapes
    consistent: those a hint names (an unrelated error, e.g. a y_test of the wrong length, gets none)."""
    y_test = _as_2d(arrays["y_test"]) if "y_test" in arrays else None
    for keys in [[k] for k in flat] + ([flat] if len(flat) > 1 else []):
        x = {k: arrays[k].reshape(1, -1) if k in keys else _as_2d(arrays[k]) for k in ("x_train", "x_test")}
        try:
            Dataset("", x["x_train"], _as_2d(arrays["y_train"]), x["x_test"], y_test)
        except ValueError:
            continue
        return keys
    return []


def _read_csv(path: pathlib.Path) -> np.ndarray:
    """The numbers of a ``.csv`` file as an ``(N, columns)`` array, or a ``ValueError`` that names the
    file and the line (1-based, as an editor counts them) numpy refused."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"Cannot read {path}: {error.strerror or error}") from None
    # Excel's "CSV UTF-8" starts the file with a byte-order mark, which would be read as part of the
    # first number (or hide a "#" header); outside comments the text is ASCII anyway. Windows
    # PowerShell's "> file.csv" and Excel's "Unicode Text" write UTF-16 with its mark: read as UTF-8,
    # every character came with a NUL byte, told "a header line must start with #" (UTF-32's marks
    # first: UTF-32-LE's starts with UTF-16-LE's)
    marks = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
             (codecs.BOM_UTF16_BE, "utf-16"))
    encoding = next((name for mark, name in marks if data.startswith(mark)), "utf-8")
    text = data.removeprefix(codecs.BOM_UTF8).decode(encoding, errors="replace")
    if "\0" in text:   # UTF-16 or UTF-32 without its mark, or not text at all
        line = text[:text.index("\0")].count("\n") + 1
        raise ValueError(f"Cannot read {path} as comma-separated numbers: line {line} holds a NUL byte (text in "
                         "UTF-16 or UTF-32 without a byte-order mark, or not a text file); save it as UTF-8.")
    # a line with nothing but spaces before its "#" (a line of spaces, often the last, or an indented
    # header) as an empty line: numpy read it as a row of one empty column
    lines = [line if line.partition("#")[0].strip() else "" for line in text.splitlines()]
    try:
        with warnings.catch_warnings():   # numpy's "input contained no data": raised by the caller instead
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(lines, delimiter=",", comments="#", ndmin=2)
    except ValueError as error:
        # numpy's "row" is the data row (from 0) in a conversion error and the line in a ragged one:
        # find the line again one at a time (only on this error path, so large files stay fast)
        reason = _bad_line(lines) or str(error).split("; use `usecols`")[0]   # numpy's advice is for its own API
        raise ValueError(f"Cannot read {path} as comma-separated numbers: {reason}") from None
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:   # named by line and column, as a conversion error is (the arrays' names are the npz's)
        row, column = bad[0]
        number = [i for i, line in enumerate(lines, 1) if line][row]
        part = "the target" if column == table.shape[1] - 1 else "an input"
        raise ValueError(f"{path}, line {number}, column {column + 1} ({part}): {table[row, column]} is not a finite "
                         "number (NaN, inf, or beyond float64's range, ~1.8e308).")
    return table


def _bad_line(lines: list[str]) -> str | None:
    """What is wrong with the first line numpy refuses, named by its 1-based line number."""
    first = None   # (line number, columns) of the first data line
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = np.loadtxt([line], delimiter=",", comments="#", ndmin=2)
        except ValueError as error:
            message = str(error)
            column = re.search(r" at row \d+, column (\d+)\.?$", message)
            where = f"line {number}, column {column[1]}" if column else f"line {number}"
            # numbers joined by another separator (Excel's semicolons where the comma is the decimal mark,
            # tabs) get the rule for separators: "1;2" was told that a header line must start with #
            other = _other_separator(line, int(column[1])) if column else None
            # an empty cell among numbers (a missing value, a comma ending each line as spreadsheets write
            # them) is no header: "1,2," was told that a header line must start with #
            empty = column is not None and _empty_among_numbers(line, int(column[1]))
            # a number in quotes (csv.QUOTE_ALL's "1","2") is no header either: it was told to mark one
            quoted = column is not None and _quoted_number(line, int(column[1]))
            # an unmarked header, the usual non-number on the first line, gets the rule for headers, and the
            # rule for separators too where the next line needs it ("x;y" over "1;2" took two runs to learn both)
            later = next((_separator_of(rest) for rest in lines[number:] if rest), None) if first is None else None
            separators = f"values must be separated by commas, not {other or later}, with '.' as the decimal point"
            hint = (f" ({separators})" if other
                    else " (an empty value: a missing number, or a comma at the end of the line)" if empty
                    else " (a number in quotes: values must be plain numbers, without quotes)" if quoted
                    else f" (a header line must start with #; {separators})" if later
                    else " (a header line must start with #)" if first is None else "")
            return f"{where}: {message[:column.start()] if column else message}{hint}"
        if first is None:
            first = (number, row.shape[1])
        elif row.shape[1] != first[1]:
            return f"line {number} has {row.shape[1]} columns, line {first[0]} has {first[1]}"
    return None


def _other_separator(line: str, column: int) -> str | None:
    """``"semicolons"``, ``"tabs"`` or ``"spaces"`` when the ``column``-th (1-based) comma-separated cell
    of ``line`` is numbers joined by them (``"1;2"``, the ``"5;2"`` of ``"1,5;2,5"``), else ``None``."""
    cells = line.partition("#")[0].split(",")
    cell = cells[column - 1] if 0 < column <= len(cells) else ""
    for name, parts in (("semicolons", cell.split(";")), ("tabs", cell.split("\t")), ("spaces", cell.split())):
        if len(parts) > 1 and all(_is_number(part) for part in parts):
            return name
    return None


def _separator_of(line: str) -> str | None:
    """The other separator (as :func:`_other_separator` names it) of the first cell of ``line`` that uses one."""
    cells = line.partition("#")[0].split(",")
    return next(filter(None, (_other_separator(line, column) for column in range(1, len(cells) + 1))), None)


def _empty_among_numbers(line: str, column: int) -> bool:
    """Whether the ``column``-th (1-based) comma-separated cell of ``line`` is empty and every other
    cell a number or empty (``",x,y"``, pandas' header with an index, is a header)."""
    cells = line.partition("#")[0].split(",")
    return (0 < column <= len(cells) and not cells[column - 1].strip()
            and all(_is_number(cell) for cell in cells if cell.strip()))


def _quoted_number(line: str, column: int) -> bool:
    """Whether the ``column``-th (1-based) comma-separated cell of ``line`` is a number in double or single
    quotes (``"1.5"``), as ``csv.writer`` with ``QUOTE_ALL`` writes every cell."""
    cells = line.partition("#")[0].split(",")
    cell = cells[column - 1].strip() if 0 < column <= len(cells) else ""
    return len(cell) > 2 and cell[0] == cell[-1] and cell[0] in "\"'" and _is_number(cell[1:-1])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _real_array(data, name: str, path: pathlib.Path) -> Tensor:
    """Array ``name`` of an open ``.npz`` as float64, or a ``ValueError`` that names the file."""
    try:
        array = data[name]
    except Exception as error:   # not BaseException: Ctrl-C still passes
        # object arrays need pickle, which is not loaded; a damaged member fails only when read, with
        # whatever its layer raises: BadZipFile (CRC), zlib.error (savez_compressed), numpy's header
        # parser's ValueError or tokenize.TokenError, EOFError
        raise ValueError(f"{path}: array {name!r} cannot be read ({error}).") from None
    if not isinstance(array, np.ndarray):   # a member not in .npy format comes back as raw bytes
        raise ValueError(f"{path}: {name!r} is not a numpy array (the archive was not written by numpy.savez).")
    if array.dtype.kind not in "iuf":   # booleans are refused, as Dataset refuses them
        raise ValueError(f"{path}: array {name!r} must hold real numbers, got dtype {array.dtype}.")
    return torch.as_tensor(array.astype(np.float64), device="cpu")


def _as_2d(t: Tensor) -> Tensor:
    return t.unsqueeze(-1) if t.dim() == 1 else t
