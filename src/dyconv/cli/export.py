from __future__ import annotations

import argparse
import ast

HELP = ("Export a model (a checkpoint or a registry model) to ONNX or TorchScript with a dynamic batch size, "
        "then re-load the file and compare it against eager at several batch sizes.")


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value. Received: {text!r}")
    try:
        return key, ast.literal_eval(value)  # numbers, True/False, None, tuples
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint or run folder written by dyconv train")
    source.add_argument("--model", metavar="NAME", help="a registry model, freshly initialised in its reference "
                        "configuration (classes, input channels), e.g. dy_mobilenetv2_035")
    parser.add_argument("--model-kwargs", nargs="*", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="options for --model, e.g. num_classes=10 small_input=True")
    parser.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="ONNX exporter: torch.export based (dynamo=True, default) or TorchScript based")
    parser.add_argument("--method", choices=("script", "trace"), default="script",
                        help="TorchScript: torch.jit.script (default) or torch.jit.trace")
    parser.add_argument("--input-size", nargs="+", type=int, metavar="N",
                        help="one sample's shape without the batch, e.g. 3 224 224 (default: the registry's)")
    parser.add_argument("--example-batch", type=int, default=2, help="batch size of the export example (>= 2)")
    parser.add_argument("--batch-size", "--batch-sizes", dest="batch_sizes", nargs="+", type=int, default=[1, 3, 7],
                        metavar="B", help="batch sizes at which the file is checked against eager (default 1 3 7)")


def _registry_sample_shape(checkpoint: str | None, name: str | None, kwargs: dict) -> tuple[int, ...]:
    """The registry's reference input (without the batch) for the model, with the channels it was built for."""
    import inspect

    import dyconv

    if checkpoint is not None:
        from dyconv.checkpoint import read_manifest

        manifest = read_manifest(checkpoint)[1]
        name, kwargs = manifest["model"], dict(manifest.get("model_kwargs", {}))
    info = dyconv.models.model_info(name)
    channels = kwargs.get("in_channels", inspect.signature(dyconv.create_model).parameters["in_channels"].default)
    return (int(channels),) + tuple(info.input_size[2:])


def run(args: argparse.Namespace) -> int:
    from dyconv.export import export_and_check

    if args.checkpoint is not None:
        if args.model_kwargs:
            raise SystemExit("dyconv export: --model-kwargs goes with --model; a checkpoint records its own")
        from dyconv.checkpoint import load_model

        model, name, kwargs = load_model(args.checkpoint), None, {}
        source = f"checkpoint {args.checkpoint}"
    else:
        import dyconv

        # the registry's reference configuration (classes, input channels) unless overridden
        info = dyconv.models.model_info(args.model)
        name = args.model
        kwargs = {"num_classes": info.num_classes, "in_channels": info.input_size[1], **dict(args.model_kwargs)}
        model = dyconv.create_model(name, **kwargs)
        source = f"model {name} {kwargs}" if kwargs else f"model {name}"
    shape = tuple(args.input_size) if args.input_size else _registry_sample_shape(args.checkpoint, name, kwargs)
    path, report = export_and_check(model, shape, args.output, format=args.format, dynamo=args.exporter == "dynamo",
                                    method=args.method, example_batch=args.example_batch, batch_sizes=args.batch_sizes)
    how = f"ONNX, {args.exporter} exporter" if args.format == "onnx" else f"TorchScript, {args.method}"
    print(f"exported {source} to {path} ({how}, dynamic batch; input (batch, {', '.join(map(str, shape))}))")
    print(report)
    if report.ok:
        print(f"OK: the re-loaded file matches eager at batch sizes {', '.join(map(str, args.batch_sizes))}")
        return 0
    print("FAILED: the re-loaded file does not match eager (see the table above)")
    return 1
