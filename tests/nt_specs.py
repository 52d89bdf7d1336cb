"""Turn the JSON architecture specs of the neural-tangents fixtures into ntkgp networks."""

from __future__ import annotations

import json
import pathlib

import numpy as np

import ntkgp

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def build(spec: list) -> ntkgp.Layer:
    layers = []
    for entry in spec:
        kind, args = entry[0], entry[1:]
        if kind == "dense":
            width, weight_var, bias_var, param = args
            layers.append(ntkgp.Dense(width, weight_var, bias_var, param))
        elif kind == "parallel":
            join, branches = args
            layers.append(ntkgp.parallel(*[build(b) for b in branches], join=join))
        else:
            layers.append({
                "relu": ntkgp.ReLU, "leaky_relu": ntkgp.LeakyReLU, "abrelu": ntkgp.ABReLU,
                "abs": ntkgp.Abs, "erf": ntkgp.Erf, "gelu": ntkgp.GELU, "sin": ntkgp.Sin,
                "cos": ntkgp.Cos, "sign": ntkgp.Sign, "layernorm": ntkgp.LayerNorm,
                "identity": ntkgp.Identity, "exp": ntkgp.Exp, "gaussian": ntkgp.Gaussian, "rbf": ntkgp.Rbf,
                "sigmoid_like": ntkgp.SigmoidLike, "hermite": ntkgp.Hermite, "polynomial": ntkgp.Polynomial,
                "monomial": ntkgp.Monomial, "gabor": ntkgp.Gabor, "rectified_monomial": ntkgp.RectifiedMonomial,
            }[kind](*args))
    return ntkgp.serial(*layers)


def load(name: str) -> tuple[dict, dict]:
    data = np.load(FIXTURES / name)
    arrays = {key: data[key] for key in data.files if key != "specs"}
    return json.loads(str(data["specs"])), arrays
