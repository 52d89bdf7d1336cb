"""The report of a comparison: ``report.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

from ntkgp.compare.calibration import MEAN_SLACK, VARIANCE_FLOOR
from ntkgp.compare.harness import (
    POINTWISE_MIN_WIDTH,
    ComparisonResult,
    check_details,
    variance_tolerance,
    variances_checked,
)


def check_notes(r: ComparisonResult) -> list[str]:
    """What the checks leave out, or cannot expect, for this run (the report and the CLI say it)."""
    notes = []
    members = r.config["ensemble_size"]
    if not variances_checked(members):
        notes.append(f"variances not checked: with {members} members the allowed relative error, "
                     f"{variance_tolerance(members):.2f}, would pass any ensemble variance below the analytic one, "
                     "even 0 (at least 11 members are needed)")
    calibration = r.calibration   # None when no width is checked point-wise
    if calibration and any(w.width >= POINTWISE_MIN_WIDTH and w.steps for w in r.widths):
        gaussian = _limit_name(r)
        late = {key: [v for s, v in zip(r.steps, calibration[key], strict=True) if s > 0 and math.isfinite(v)]
                for key in ("mean_fail", "var_fail")}   # NaN: a step not simulated (its covariance overflowed)
        rates = [f"the {name} check {_percent_range(late[key])} of the time"
                 for name, key in (("mean", "mean_fail"), ("variance", "var_fail"))
                 if late[key] and (name == "mean" or variances_checked(members))]
        if not calibration["ensembles"]:
            notes.append(f"no calibration: simulating ensembles of {members} exact draws from the {gaussian} on "
                         f"{len(r.plot_x)} test points would cost more than ntkgp.compare.calibration.DRAW_FLOPS")
        elif rates:
            notes.append(f"calibration: ensembles of {members} exact draws from the {gaussian} itself (no "
                         f"finite-width error; {calibration['ensembles']} simulated) fail {' and '.join(rates)} at a "
                         "step after step 0: the test points are correlated, so their errors come together; a "
                         "FAIL line says how often they score as low")
    narrow = [w.width for w in r.widths if w.width < POINTWISE_MIN_WIDTH]
    if narrow:
        notes.append(f"widths {narrow} are reported but not checked point-wise (mean and variance within): those "
                     f"checks apply from width {POINTWISE_MIN_WIDTH}, as the acceptance criteria (docs/compare.md) set")
    if r.stopped is not None:
        trained = {w.width for w in r.widths}
        missing = [w for w in r.config["widths"] if w not in trained]
        if missing:
            notes.append(f"widths {missing} were not trained: the comparison stopped early")
        if r.config["divergence_check"] and r.divergence is None:
            notes.append("the runs above the stability limit were not made: the comparison stopped early")
    # ">=", the comparison of ntkgp.predict's warning on the same two numbers (lr_fraction=1 gives the
    # limit itself): with ">" the CLI warned "at or above the stability limit" and no NOTE said so
    if r.learning_rate >= r.max_learning_rate:
        notes.append(f"the learning rate is {r.learning_rate / r.max_learning_rate:.3g} x the stability limit "
                     "2m/lambda_max: the linearized (infinite-width) predictions do not converge (at the limit "
                     "their top mode oscillates, above it grows), and the finite networks (which may instead "
                     "catapult to a flatter region) are not expected to follow them")
    return notes


def _percent_range(values: list[float]) -> str:
    low, high = f"{100 * min(values):.1f}", f"{100 * max(values):.1f}"
    return f"{low} %" if low == high else f"{low}-{high} %"


#: The files of a report besides its band figures, ``band_width{width}.png`` (see :func:`write_report`).
REPORT_FILES = ("report.json", "report.md", "scaling.png", "loss.png")


def check_report_folder(out: str | pathlib.Path) -> None:
    """``ValueError`` where :func:`write_report` could not write into ``out``: ``out`` is a file, or one
    of the report's names there (``report.json``, ``report.md``, ``scaling.png``, ``loss.png``,
    ``band_width*.png``) is held by something other than a regular file, such as a folder (writing
    or removing it raised ``IsADirectoryError``, after the training: the CLI checks before it), or
    ``out`` is empty."""
    if not str(out):   # Path("") is ".": the report, and the removal of its old figures, went there unasked
        raise ValueError("the report folder is an empty path; name a folder ('.' for the current one)")
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the report to {str(out)!r}: it is a file, not a folder")
    if not out.is_dir():   # created by write_report: nothing in the way
        return
    names = [*REPORT_FILES, *sorted(p.name for p in out.glob("band_width*.png"))]
    blocked = [name for name in names if (out / name).exists() and not (out / name).is_file()]
    if blocked:
        what = "; ".join(f"{name} there is {'a folder' if (out / name).is_dir() else 'not a regular file'}"
                         for name in blocked)
        raise ValueError(f"cannot write the report to {str(out)!r}: {what}, where the report writes a file: "
                         "remove or rename it, or choose another folder")


def write_report(result: ComparisonResult, out: str | pathlib.Path) -> pathlib.Path:
    """Write ``report.json``, ``report.md`` and the figures into ``out``; returns the folder.

    ``report.json`` is ``result.to_dict()`` with ``"notes"``: report.md's NOTE lines
    (:func:`check_notes`), what the checks leave out or cannot expect for this run.

    Figures an earlier report left in ``out`` (``band_width*.png``, ``scaling.png``,
    ``loss.png``) are removed, so the folder holds one report. The files are written in a scratch
    folder inside ``out`` and moved in when all are done: interrupted (the figures take seconds),
    ``out`` keeps its earlier report whole. A ``ValueError`` (:func:`check_report_folder`), before
    anything is written, when ``out`` is a file or a folder (or another non-file) holds one of
    those names."""
    if not isinstance(result, ComparisonResult):   # None: an AttributeError from inside to_dict
        raise ValueError(f"result must be the ComparisonResult of run_comparison, got {type(result).__name__}.")
    check_report_folder(out)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as scratch_name:
        scratch = pathlib.Path(scratch_name)
        # strict JSON: an undefined slope (a frozen layer, a bias below the noise) is null, not NaN;
        # "notes" are report.md's NOTE lines, which say what a script reading "checks" must not expect
        data = {**result.to_dict(), "notes": check_notes(result)}
        (scratch / "report.json").write_text(json.dumps(_finite_or_null(data), indent=1, allow_nan=False))
        figures = _figures(result, scratch)
        # UTF-8 whatever the locale: its Θ, λ and ‖ are not in cp1252 (Windows' default), and the locale's encoding
        # raised UnicodeEncodeError there (and in the C locale without UTF-8 mode), after the whole comparison ran
        (scratch / "report.md").write_text(_markdown(result, figures), encoding="utf-8")
        for name in [*figures, "report.json", "report.md"]:
            os.replace(scratch / name, out / name)
    for stale in {*out.glob("band_width*.png"), out / "scaling.png", out / "loss.png"} - {out / f for f in figures}:
        stale.unlink(missing_ok=True)   # figures of an earlier report in this folder
    return out


def _finite_or_null(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def _log_values(values):
    """``values`` as an array with those a log axis cannot show (zero, negative) as NaN, where a
    line breaks: a bias estimated as 0, a layer that did not move."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    return np.where(values > 0, values, np.nan)


def _limit_name(r: ComparisonResult) -> str:
    """What the ensembles are compared with: the NTK-GP, or the NNGP gradient flow (readout only)."""
    return "NNGP" if r.kernel == "nngp" else "NTK-GP"


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}g}"


def _cell(value: float) -> str:
    """A number of the per-width table: "—" where report.json has null (NaN or infinite), so that the
    two files agree; an "inf" here was an overflow (a squared error far above the stability limit),
    not a measured value, and null in report.json."""
    return _fmt(value) if value is not None and math.isfinite(value) else "—"


def _engines(r) -> str:
    engines = sorted({w.engine for w in r.widths if w.engine})
    return f", {' and '.join(engines)} engine of train_ensemble" if engines else ""


def _network_line(c: dict) -> str:
    if c.get("spec") is None:
        # bias_var None is --no-bias: "bias_var None" named a Python value, not the network
        biases = "no biases" if c["bias_var"] is None else f"bias_var {c['bias_var']}"
        layers = "layer" if c["depth"] == 1 else "layers"
        return (f"- network: {c['depth']} hidden {c['activation']} {layers}, weight_var {c['weight_var']}, "
                f"{biases}, {c['parameterization']} parameterization; widths {list(c['widths'])}")
    return f"- network: the spec below, shown at width {c['widths'][0]}; widths {list(c['widths'])}"


def _markdown(r: ComparisonResult, figures: list[str]) -> str:
    c = r.config
    kind = "readout only (NNGP)" if r.kernel == "nngp" else "all layers (NTK)"
    gp = _limit_name(r)
    symbol = "K" if r.kernel == "nngp" else "Θ"
    lines = [
        "# Finite ensembles vs infinite-width predictions", "",
        f"- dataset: {r.dataset}",
        _network_line(c),
        f"- training: full-batch gradient descent on (1/2m)‖f − Y‖², {kind}, learning rate {_fmt(r.learning_rate, 4)} "
        f"({_fmt(r.learning_rate / r.max_learning_rate, 3)} × 2m/λ_max = {_fmt(r.max_learning_rate, 4)}), "
        f"{c['ensemble_size']} members per width, {c['dtype']}, seed {c['seed']}{_engines(r)}",
        f"- analytic side: exact discrete-time predictions (I − η{symbol}/m)^s of ntkgp.predict.GradientFlow; "
        f"{'NNGP' if r.kernel == 'nngp' else 'NTK'} eigenvalues {[float(f'{v:.3g}') for v in r.eigenvalues]}",
        f"- recorded steps {r.steps} (times t = η·steps = {[float(f'{t:.3g}') for t in r.times]}, "
        f"the t of ntkgp.predict at its default learning_rate=1); "
        f"total run {r.seconds:.0f} s",
        *(["- software: " + ", ".join(f"{k} {v}" for k, v in r.versions.items())] if r.versions else []), "",
        *(["```", c["spec"], "```", ""] if c.get("spec") is not None else []),
        "## Checks", "",
    ]
    if r.checks:
        details = check_details(r)
        lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" + (f" ({details[name]})" if name in details else "")
                  for name, ok in r.checks.items()]
    else:
        lines.append("- (no acceptance checks apply to these widths)")
    lines += [f"- NOTE: {note}" for note in check_notes(r)]
    # from a width that recorded a step: one that diverged at step 0 has no layer changes
    groups = next((list(w.layer_change) for w in r.widths if w.layer_change), [])
    columns = ["width", "step", "loss", "mean within", "var within", "mean RMSE", "mean bias", "bias noise",
               "var rel. error", "weight change", *(f"{g} weights" for g in groups), "NTK change", "seconds"]
    lines += ["", "## Per width and step", "",
              f"Mean within: fraction of test points with |mean − {gp} mean| ≤ 3 SE + {MEAN_SLACK:g}; var within: "
              f"fraction with |var − {gp} var| ≤ {variance_tolerance(c['ensemble_size']):.3g} max({gp} var, "
              f"{VARIANCE_FLOOR:g} × the "
              "larger of its largest value at that step and the prior's largest variance); "
              "mean bias: RMS error of the mean with the "
              "Monte-Carlo noise (SE²) removed, and the bias that two standard deviations of that estimate "
              "amount to for unbiased members (below it, a bias is noise). Changes are relative to "
              "initialization, averaged over members. —: undefined or overflowed (NaN or infinite; null in "
              "report.json).", "",
              "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for w in r.widths:
        for i, s in enumerate(w.steps):
            cells = [str(w.width), str(s), *(_cell(v[i]) for v in (
                w.train_loss, w.mean_within, w.var_within, w.mean_rmse, w.mean_bias, w.mean_bias_noise,
                w.var_rel_error, w.weight_change, *(w.layer_change[g] for g in groups), w.ntk_change)),
                f"{w.seconds:.0f}" if w.seconds >= 10 else f"{w.seconds:.2g}"]   # 0.0 hid runs under 0.05 s
            lines.append("| " + " | ".join(cells) + " |")
        if w.diverged_at is not None:
            lines.append(f"| {w.width} | diverged at step {w.diverged_at} |" + " |" * (len(columns) - 2))
    lines += ["", "## Scaling with width (log–log slopes at the last step)", "",
              "Theory: input and readout weights −1/2, width × width weights −1 (so the total follows the "
              "hidden layers in NTK parameterization), NTK change bounded by −1/2 and closer to −1 "
              "(Lee et al. 2019, Fig. 1; Dyer & Gur-Ari 2020).", ""]
    lines += ([f"- {name}: {_fmt(value)}" for name, value in r.slopes.items()]
              or ["- (needs two widths that reach the last step)"])
    if r.divergence is not None:
        d = r.divergence
        lines += ["", "## Above the stability limit 2m/λ_max", "",
                  f"Linearized (infinite-width) prediction at {d['analytic_factor']} × 2m/λ_max: expected training "
                  f"loss {_fmt(d['analytic_loss'][0])} at step 0 → {_fmt(d['analytic_loss'][-1])} at step "
                  f"{d['analytic_steps'][-1]} (diverges).", ""]
        for run in d["runs"]:
            peak = max(run["loss"]) if run["loss"] else float("nan")
            if run["diverged_at"] is not None:
                outcome = f"diverged at step {run['diverged_at']}"
            elif peak > run["loss"][0]:
                outcome = (f"did not diverge: loss {_fmt(run['loss'][0])} → peak {_fmt(peak)} → "
                           f"{_fmt(run['loss'][-1])} at step {run['steps'][-1]} (catapult: the loss spikes, the "
                           "NTK's top eigenvalue drops, training converges; Lewkowycz et al. 2020)")
            else:
                outcome = (f"did not diverge: the loss fell from {_fmt(run['loss'][0])} to {_fmt(run['loss'][-1])} "
                           f"at step {run['steps'][-1]} without a spike")
            lines.append(f"- finite networks, width {d['width']}, 4 members, {run['factor']} × 2m/λ_max "
                         f"(η = {_fmt(run['learning_rate'], 4)}): {outcome}.")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _figures(r: ComparisonResult, out: pathlib.Path) -> list[str]:
    import numpy as np

    # Above the stability limit the analytic band is inf and NaN: matplotlib leaves such values out,
    # and numpy's "invalid value encountered in add" from the band's arithmetic told nothing more.
    with np.errstate(invalid="ignore", over="ignore"):
        return _draw_figures(r, out)


def _draw_figures(r: ComparisonResult, out: pathlib.Path) -> list[str]:
    # Figure objects without pyplot: matplotlib.use("Agg") switched the caller's backend for the whole
    # process (a notebook stopped showing figures), and pyplot kept a figure open whenever saving failed
    import matplotlib.ticker
    import numpy as np
    from matplotlib.figure import Figure

    names = []
    gp = _limit_name(r)
    x = np.asarray(r.plot_x)
    order = np.argsort(x)
    shown = [i for i, s in enumerate(r.steps) if s > 0] or list(range(len(r.steps)))
    for w in r.widths:
        if not w.steps:
            continue
        cols = [i for i in shown if i < len(w.steps)]
        if not cols:  # diverged before the first step shown
            continue
        fig = Figure(figsize=(4.2 * len(cols), 3.4))
        axes = fig.subplots(1, len(cols), squeeze=False)
        for ax, i in zip(axes[0], cols, strict=True):
            mu, sd = np.asarray(r.analytic_mean[i])[order], np.asarray(r.analytic_std[i])[order]
            em, es = np.asarray(w.ensemble_mean[i])[order], np.asarray(w.ensemble_std[i])[order]
            ax.fill_between(x[order], mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.25, label=f"{gp} ±2σ")
            ax.plot(x[order], mu, color="C0", label=f"{gp} mean")
            ax.plot(x[order], em, "--", color="C3", label=f"ensemble mean (E={r.config['ensemble_size']})")
            ax.plot(x[order], em - 2 * es, ":", color="C3", lw=1)
            ax.plot(x[order], em + 2 * es, ":", color="C3", lw=1, label="ensemble ±2σ")
            if r.y_test is not None:
                ax.plot(x[order], np.asarray(r.y_test)[order], color="0.4", lw=0.8, label="test targets")
            if r.x_train_plot:   # empty where the axis is the test point index (d ≥ 3, 2-D off a circle)
                ax.scatter(r.x_train_plot, r.y_train, color="k", zorder=5, s=14, label="training data")
            ax.set_title(f"width {w.width}, step {r.steps[i]} (t = {r.times[i]:.3g})")
            ax.set_xlabel(r.plot_label)
        axes[0][0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        name = f"band_width{w.width}.png"
        fig.savefig(out / name, dpi=110)
        names.append(name)

    complete = [w for w in r.widths if w.steps == r.steps]
    if len(complete) >= 2:
        widths = np.asarray([w.width for w in complete], dtype=float)
        fig = Figure(figsize=(10, 3.8))
        axes = fig.subplots(1, 2)
        for colour, i in enumerate(shown):
            axes[0].loglog(widths, _log_values([w.mean_bias[i] for w in complete]), "o-", color=f"C{colour}",
                           label=f"step {r.steps[i]}")
            axes[0].loglog(widths, _log_values([w.mean_bias_noise[i] for w in complete]), ":", color=f"C{colour}",
                           lw=1)
        axes[0].set_xlabel("width")
        axes[0].set_ylabel("bias of the ensemble mean")
        axes[0].set_title("mean error vs width (dotted: noise level)")
        axes[0].legend(fontsize=8)
        series = [("ntk_change", [w.ntk_change[-1] for w in complete], "NTK", "s-")]
        series += [(f"{g}_weight_change", [w.layer_change[g][-1] for w in complete], f"{g} weights", "o-")
                   for g in complete[0].layer_change]
        # a series with no positive value (no change at all, e.g. under inputs of 1e30 that saturate
        # the first layer) has nothing to draw: matplotlib warned "Data has no positive values" into
        # the CLI's output; the figure names it instead
        series = [(key, _log_values(values), label, marker) for key, values, label, marker in series]
        flat = [label for _, values, label, _ in series if np.isnan(values).all()]
        drawn = [s for s in series if not np.isnan(s[1]).all()]
        for key, values, label, marker in drawn:
            slope = r.slopes.get(key, float("nan"))
            axes[1].loglog(widths, values, marker, label=f"{label} (slope {slope:.2f})")
        if drawn:
            top = max(np.nanmax(v) for _, v, _, _ in drawn)
            axes[1].loglog(widths, top * (widths / widths[0]) ** -0.5, "k:", label="∝ width^(−1/2)")
            axes[1].loglog(widths, top * (widths / widths[0]) ** -1.0, "k--", label="∝ width^(−1)")
            axes[1].legend(fontsize=8)
        else:   # the widths' axis as in the other panel
            axes[1].set_xscale("log")
            axes[1].set_xlim(widths[0] / 1.2, widths[-1] * 1.2)
        if flat:
            axes[1].text(0.02, 0.02, f"no positive change, not drawn: {', '.join(flat)}", fontsize=7,
                         transform=axes[1].transAxes)
        axes[1].set_ylabel("relative change")
        axes[1].set_xlabel("width")
        for ax in axes:  # label the widths themselves: log-axis minor labels overlap
            ax.set_xticks(widths, [str(int(w)) for w in widths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[1].set_title(f"lazy training at step {r.steps[-1]}")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        names.append("scaling.png")

    if not any(w.steps for w in r.widths):   # every width diverged at step 0: nothing to draw
        return names
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for w in r.widths:
        if w.steps:
            ax.semilogy([max(s, 0.5) for s in w.steps], np.maximum(w.train_loss, 1e-16), "o-", label=f"width {w.width}")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (ensemble mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    names.append("loss.png")
    return names
