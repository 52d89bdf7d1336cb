"""neural-tangents side of benchmarks/kernels.py (run with an interpreter that has it installed).

Prints one JSON line per dtype: first-call (compile) time, steady time, peak memory increase.
"""

import json
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _memory import peak_mib, start_measuring

n, d, depth, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from jax import config  # noqa: E402

config.update("jax_enable_x64", dtype == "float64")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from neural_tangents import stax  # noqa: E402

layers = []
for _ in range(depth):
    layers += [stax.Dense(512, W_std=2**0.5, b_std=0.1), stax.Relu()]
layers.append(stax.Dense(1, W_std=2**0.5, b_std=0.1))
kernel_fn = jax.jit(stax.serial(*layers)[2], static_argnames="get")
x = jnp.asarray(np.random.default_rng(0).random((n, d)), dtype=dtype)
t = time.perf_counter()
kernel_fn(x, None, get=("nngp", "ntk")).ntk.block_until_ready()
first = time.perf_counter() - t
times = []
base = start_measuring()
for _ in range(3):
    t = time.perf_counter()
    kernel_fn(x, None, get=("nngp", "ntk")).ntk.block_until_ready()
    times.append(time.perf_counter() - t)
print(json.dumps({"first": first, "time": min(times), "peak_mib": peak_mib() - base}))
