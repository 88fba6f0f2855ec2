"""Batch-1 inference cost of DY models against their static twins in onnxruntime (CPU).

For each registry DY model: export it and its static twin with a dynamic batch axis (dyconv.export), load
both in onnxruntime, then time batch-1 runs interleaved (static, DY, static, DY, ...) so that machine
noise hits both alike, and report the medians and their ratio.

    PYTHONPATH=src python benchmarks/onnx_batch1.py --models dy_mobilenetv2_050 dy_resnet18 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import dyconv
from dyconv.export import check_parity, export_onnx, load_exported


def time_interleaved(runs: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every runner, calling them in turn ``repeats`` times (order alternating)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runs[name](x)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dy_mobilenetv2_050", "dy_resnet18"])
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, exporter {args.exporter}, "
          f"batch 1, {args.repeats} interleaved repeats, medians")
    print("| DY model | static twin | input | static ms | DY ms | DY / static |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            info = dyconv.models.model_info(name)
            shape = tuple(info.input_size[1:])
            runs = {}
            for model_name in (info.twin, name):
                model = dyconv.create_model(model_name).eval()
                path = export_onnx(model, torch.randn(2, *shape), Path(tmp) / f"{model_name}.onnx",
                                   dynamo=args.exporter == "dynamo")
                if args.threads:
                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = args.threads
                    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    input_name = session.get_inputs()[0].name
                    runs[model_name] = lambda x, s=session, n=input_name: s.run(None, {n: x.numpy()})
                else:
                    runs[model_name] = load_exported(path)
                report = check_parity(model, load_exported(path), shape, batch_sizes=(1, 2))
                if not report.ok:
                    raise SystemExit(f"{model_name}: the ONNX file does not match eager\n{report}")
            x = torch.randn(1, *shape)
            times = time_interleaved(runs, x, args.repeats, args.warmup)
            static_ms = statistics.median(times[info.twin]) * 1e3
            dy_ms = statistics.median(times[name]) * 1e3
            print(f"| {name} | {info.twin} | {'×'.join(map(str, shape))} | {static_ms:.2f} | {dy_ms:.2f} | "
                  f"{dy_ms / static_ms:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
