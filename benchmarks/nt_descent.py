"""neural-tangents side of benchmarks/descent.py (run with an interpreter that has it installed)."""

import json
import sys
import time

import numpy as np
from jax import config

config.update("jax_enable_x64", True)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
from jax.nn import log_softmax  # noqa: E402

path, momentum = sys.argv[1], None if sys.argv[2] == "None" else float(sys.argv[2])
data = np.load(path)
k_dd, k_td, y, times = data["k_dd"], data["k_td"], data["y"], data["times"]


def run():
    predict_fn = nt.predict.gradient_descent(lambda fx, t: -jnp.mean(jnp.sum(log_softmax(fx) * t, -1)), k_dd, y,
                                             learning_rate=1.0, momentum=momentum)
    return jax.block_until_ready(predict_fn(times, 0.0, np.zeros((k_td.shape[0], y.shape[1])), k_td))


run()   # an untimed first call pays JAX's tracing and compilation, as torch's first calls ran before ntkgp's timing
start = time.perf_counter()
train, test = run()
elapsed = time.perf_counter() - start
out = path.replace(".npz", f"_nt_{momentum}.npz")
np.savez(out, train=np.asarray(train), test=np.asarray(test))
print(json.dumps({"time": elapsed, "out": out}))
