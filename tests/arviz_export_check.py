"""Check ntkgp's numpy-level ArviZ export in any Python with numpy, scipy and ArviZ, no torch.

Loads ``ntkgp/bayes/{_arrays,metrics,inference_data}.py`` (of the ntkgp the interpreter would
import, else of this checkout) under empty parent packages, so
``ntkgp/__init__.py`` (which imports torch) never runs. Used by ``tests/test_bayes.py`` with the
test interpreter, and with ``$NTKGP_ARVIZ1_PYTHON`` (e.g. a Python 3.12 venv holding ArviZ 1.x)
when that is set:

    python tests/arviz_export_check.py      # prints "ok arviz <version>" or fails
"""

import importlib.util
import math
import pathlib
import sys
import types
import warnings

import numpy as np

# the ntkgp this interpreter imports (found, not imported: that would import torch), installed from a
# wheel too; the checkout's beside this file for an interpreter without one (the ArviZ 1.x venv)
SPEC = importlib.util.find_spec("ntkgp")
PACKAGE = (pathlib.Path(next(iter(SPEC.submodule_search_locations))) if SPEC and SPEC.submodule_search_locations
           else pathlib.Path(__file__).resolve().parents[1] / "ntkgp")
for name, path in (("ntkgp", PACKAGE), ("ntkgp.bayes", PACKAGE / "bayes")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package

from ntkgp.bayes.inference_data import arviz_major_version, draws_to_inference_data, import_arviz  # noqa: E402


def main() -> None:
    az = import_arviz()
    rng = np.random.default_rng(0)
    s, m, k, noise = 400, 30, 3, 0.2
    f = rng.normal(size=(s, m, k)) * 0.3 + np.linspace(-1, 1, m)[None, :, None]
    y = np.linspace(-1, 1, m)[:, None] + rng.normal(size=(m, k)) * math.sqrt(noise)
    data = draws_to_inference_data(f, y, noise, num_chains=4, seed=1)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert group in data.children if hasattr(data, "children") else group in data.groups(), group
    pp = data["posterior_predictive"]["y"]
    assert pp.dims == ("chain", "draw", "obs_id", "output") and pp.shape == (4, 100, m, k), (pp.dims, pp.shape)
    assert data["observed_data"]["y"].dims == ("obs_id", "output")
    ll = np.asarray(data["log_likelihood"]["y"]).reshape(s, m, k)
    expected = -0.5 * (np.log(2 * math.pi * noise) + (y[None] - f) ** 2 / noise)
    assert np.allclose(ll, expected, rtol=1e-12, atol=1e-12)
    # Posterior-predictive draws are f + sqrt(noise) * standard normal.
    resid = np.asarray(pp).reshape(s, m, k) - f
    assert abs(resid.var() / noise - 1) < 0.05, resid.var()
    assert np.allclose(np.asarray(data["posterior"]["f"]).reshape(s, m, k), f)
    # PSIS-LOO against its exact value: latent draws f_i ~ N(mu_i, tau^2) reweighted by 1/p(y_i | f_i)
    # give elpd_i = -log E[1/N(y_i | f_i, noise)] = -1/2 log(2 pi noise) + 1/2 log(v / noise)
    # - (y_i - mu_i)^2 / (2 v), v = noise - tau^2. Over 12 seeds (400 draws, 30 points, Pareto k <= 0.69)
    # |elpd_loo - exact| <= 0.22, while it lies 1.1-2.2 below the in-sample lppd and 28 from a density
    # without its log(2 pi) term.
    tau, mu = 0.1, np.linspace(-1, 1, m)
    f1 = rng.normal(size=(s, m)) * tau + mu
    y1 = mu + rng.normal(size=m) * math.sqrt(noise)
    one = draws_to_inference_data(f1, y1, noise, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(one)
    elpd = float(getattr(loo, "elpd_loo", getattr(loo, "elpd", np.nan)))
    v = noise - tau**2
    exact = float((-0.5 * math.log(2 * math.pi * noise) + 0.5 * math.log(v / noise) - (y1 - mu) ** 2 / (2 * v)).sum())
    assert abs(elpd - exact) < 0.5, (elpd, exact)
    assert "torch" not in sys.modules
    print(f"ok arviz {az.__version__} (major {arviz_major_version()}), {type(data).__name__}, elpd_loo {elpd:.3f}")


if __name__ == "__main__":
    main()
