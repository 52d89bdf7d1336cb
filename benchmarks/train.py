"""Ensemble training throughput: ntkgp's stacked trainer vs a per-member loop, same run.

Both train E networks of the same architecture (2 hidden erf layers of the given width, NTK
parameterization, the ``sin`` dataset of ``ntkgp compare``: 5 points) by full-batch gradient
descent on (1/2m)‖f − Y‖² for the same number of steps. The baseline is a straightforward loop
over E ``torch.nn.Sequential`` models, each with its own ``torch.optim.SGD``. Network
construction is excluded from the timings. Printed: member-steps per second of the loop and of
both engines of ``train_ensemble`` (``"stacked"``: all members in one batched torch step;
``"fused"``: the compiled CPU kernel, one member at a time in cache), and their ratios to the loop.

    python benchmarks/train.py [--members 64 --width 512 --steps 200 --device cpu --repeats 3]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import ntkgp
from ntkgp.compare import sin_dataset
from ntkgp.finite import fused
from ntkgp.finite.train import train_ensemble


class ScaledLinear(torch.nn.Module):
    """``sqrt(σ_w²/n) x W + σ_b b``: NTK parameterization in plain PyTorch, for the baseline."""

    def __init__(self, n_in: int, n_out: int, weight_var: float, bias_var: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out))
        self.bias = torch.nn.Parameter(torch.randn(n_out))
        self.scale, self.bias_scale = math.sqrt(weight_var / n_in), math.sqrt(bias_var)

    def forward(self, x):
        return self.scale * (x @ self.weight) + self.bias_scale * self.bias


class Erf(torch.nn.Module):
    def forward(self, x):
        return torch.erf(x)


def baseline(x, y, members: int, width: int, steps: int, lr: float, device) -> float:
    models = [torch.nn.Sequential(ScaledLinear(1, width, 2.25, 0.0025), Erf(), ScaledLinear(width, width, 2.25, 0.0025),
                                  Erf(), ScaledLinear(width, 1, 2.25, 0.0025)).to(device) for _ in range(members)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    m = y.numel()
    start = time.perf_counter()
    for _ in range(steps):
        for model, opt in zip(models, optimizers, strict=True):
            opt.zero_grad()
            loss = 0.5 * ((model(x) - y) ** 2).sum() / m
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return members * steps / (time.perf_counter() - start)


def ensemble(x, y, members: int, width: int, steps: int, lr: float, device, engine: str) -> float:
    net = ntkgp.mlp(2, "erf", 2.25, 0.0025, width=width)
    kwargs = dict(ensemble_size=members, learning_rate=lr, device=device, engine=engine)
    train_ensemble(net, x, y, record_steps=[1], **kwargs)   # compiles the fused kernel if not cached
    # time only training: subtract a run that builds the ensemble and records step 0
    t0 = time.perf_counter()
    train_ensemble(net, x, y, record_steps=[0], **kwargs)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = train_ensemble(net, x, y, record_steps=[steps], **kwargs)
    assert history.settings["engine"] == engine
    return members * steps / (time.perf_counter() - t0 - build)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of loop, stacked, fused in turn; the best of each is printed (one sample "
                             "per side swung the ratio 3x with the machine's load)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available to this torch")
    data = sin_dataset()
    x, y = data.x_train.float().to(device), data.y_train.float().to(device)
    lr = 0.1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; E={args.members}, "
          f"width {args.width}, {args.steps} steps, 5 training points, float32")
    engines = ["stacked", "fused"] if device.type == "cpu" else ["stacked"]
    unavailable = "fused" in engines and fused.library(torch.float32)
    if isinstance(unavailable, str):
        print(f"  train_ensemble(engine='fused'): not available here ({unavailable})")
        engines.remove("fused")
    best = dict.fromkeys(["loop", *engines], 0.0)
    for _ in range(max(1, args.repeats)):   # in turn, so that a burst of load hits every side alike
        torch.manual_seed(0)
        best["loop"] = max(best["loop"], baseline(x, y, args.members, args.width, args.steps, lr, device))
        for engine in engines:
            best[engine] = max(best[engine], ensemble(x, y, args.members, args.width, args.steps, lr, device, engine))
    print(f"  (best of {max(1, args.repeats)} rounds)")
    print(f"  per-member loop of nn.Sequential + SGD:        {best['loop']:10.0f} member-steps/s")
    for engine in engines:
        print(f"  train_ensemble(engine={engine!r}):{' ' * (10 - len(engine))} {best[engine]:10.0f} member-steps/s, "
              f"{best[engine] / best['loop']:.1f}x the loop")


if __name__ == "__main__":
    main()
