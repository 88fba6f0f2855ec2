"""Time dyconv.keras.DynamicConv2D against keras.layers.Conv2D of the same shape, on each Keras backend.

    PYTHONPATH=src python benchmarks/keras_bench.py                      # torch, jax and tensorflow
    PYTHONPATH=src python benchmarks/keras_bench.py --backends jax --repeats 31

For each backend (a fresh process, since Keras fixes its backend at import) and each case, the
static and the dynamic model run interleaved (static, dynamic, static, ...) after warm-up; the
table gives the median times and their ratio. Inference is ``model.predict_on_batch`` (each
backend's compiled predict function: jit on jax, tf.function on tensorflow, eager on torch);
training is ``model.train_on_batch`` with SGD and an MSE loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [  # batch, size, in channels, filters, kernel
    (32, 32, 64, 64, 3),
    (1, 32, 64, 64, 3),
]


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_backend(repeats: int, num_experts: int) -> list[dict]:
    import keras
    import numpy as np

    from dyconv.keras import DynamicConv2D

    rows = []
    for batch, size, cin, cout, k in CASES:
        x = np.random.default_rng(0).standard_normal((batch, size, size, cin)).astype("float32")
        models = {}
        for name in ("static", "dynamic"):
            inputs = keras.Input((size, size, cin))
            if name == "static":
                layer = keras.layers.Conv2D(cout, k, padding="same")
            else:
                layer = DynamicConv2D(cout, k, num_experts, padding="same")
            model = keras.Model(inputs, layer(inputs))
            model.compile(optimizer="sgd", loss="mse")
            models[name] = model
        y = np.zeros((batch, size, size, cout), "float32")
        for task in ("inference", "training"):
            calls = {name: (lambda m=m: m.predict_on_batch(x)) if task == "inference" else
                     (lambda m=m: m.train_on_batch(x, y)) for name, m in models.items()}
            for fn in calls.values():  # warm-up: compilation, caches
                fn(), fn()
            times = {name: [] for name in calls}
            for _ in range(repeats):
                for name, fn in calls.items():
                    times[name].append(_once(fn))
            static, dynamic = (statistics.median(times[n]) for n in ("static", "dynamic"))
            rows.append({"backend": keras.backend.backend(), "task": task, "batch": batch,
                         "shape": f"{size}x{size}x{cin}->{cout} {k}x{k}", "static_ms": 1e3 * static,
                         "dynamic_ms": 1e3 * dynamic, "ratio": dynamic / static})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="torch,jax,tensorflow")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_backend(args.repeats, args.num_experts)))
        return 0
    rows = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats),
                                 "--num-experts", str(args.num_experts)], env=env, capture_output=True, text=True)
        if result.returncode:
            print(f"{backend}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        rows += json.loads(result.stdout.strip().splitlines()[-1])
    print(f"| backend | task | batch | shape | Conv2D ms | DynamicConv2D (K={args.num_experts}) ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['task']} | {r['batch']} | {r['shape']} | {r['static_ms']:.2f} | "
              f"{r['dynamic_ms']:.2f} | {r['ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
