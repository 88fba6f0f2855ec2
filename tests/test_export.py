"""Deployment: ONNX with a dynamic batch (both exporters), TorchScript trace/script, FX; parity against eager."""

import warnings

import pytest
import torch
from torch import nn

import dyconv
from dyconv.export import (
    DynamicConvTracer,
    check_parity,
    export_onnx,
    export_torchscript,
    layer_channels,
    load_exported,
    onnx_batch_constants,
    symbolic_trace,
)
from dyconv.functional import BATCH_GENERIC_STRATEGIES, select_strategy
from dyconv.layers import DYNAMIC_CONV_TYPES

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

LAYER = {1: dyconv.DynamicConv1d, 2: dyconv.DynamicConv2d, 3: dyconv.DynamicConv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZE = {1: 16, 2: 8, 3: 6}
EXPORT_BATCH = 13  # unusual on purpose: no layer size equals it, so a constant holding it came from the batch
CHECK_BATCHES = (1, 3, 7)


def layer_stack(rank, strategy="auto"):
    """Every kind of dynamic layer the networks use, in one small model: strided dense 3×3, depthwise without
    bias, pointwise, grouped dilated with reflect padding, strided pointwise; BN and ReLU between."""
    L = LAYER[rank]
    kw = {"strategy": strategy}
    model = nn.Sequential(
        L(3, 8, 3, stride=2, padding=1, **kw), NORM[rank](8), nn.ReLU(),
        L(8, 8, 3, padding=1, groups=8, bias=False, **kw), nn.ReLU(),
        L(8, 12, 1, **kw),
        L(12, 12, 3, padding=2, dilation=2, groups=3, padding_mode="reflect", **kw),
        L(12, 6, 1, stride=2, **kw),
    )
    with torch.no_grad():  # non-trivial BN statistics, so BN folding mistakes would show
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    dyconv.set_temperature(model, 1.0)  # a peaked attention: parity must hold away from uniform mixing
    return model.eval()


def sample_shape(rank):
    return (3,) + (SIZE[rank],) * rank


def calibrate_batchnorm(model, shape):
    """BN running statistics from one random batch: a fresh deep network's eval outputs are otherwise ~1e-12."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def dy_network():
    """A whole DY network from the registry: DY-MobileNetV2 ×0.35, small-input variant, 32×32 input."""
    model = dyconv.create_model("dy_mobilenetv2_035", num_classes=10, small_input=True)
    dyconv.set_temperature(model, 1.0)
    shape = (3, 32, 32)
    calibrate_batchnorm(model, shape)
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).abs().max() > 1e-2  # a meaningful output scale for parity
    return model, shape


def assert_batch_free_onnx(path, model):
    """The graph itself: a symbolic batch dimension, and no integer constant derived from the export batch."""
    proto = onnx.load(str(path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        assert dim.dim_param and not dim.HasField("dim_value"), f"{value.name} has a fixed batch dimension"
    assert onnx_batch_constants(proto, EXPORT_BATCH, layer_channels(model)) == []


def export_and_check(model, shape, tmp_path, dynamo):
    x = torch.randn((EXPORT_BATCH, *shape))
    path = export_onnx(model, x, tmp_path / "model.onnx", dynamo=dynamo)
    assert_batch_free_onnx(path, model)
    report = check_parity(model, load_exported(path), shape, batch_sizes=CHECK_BATCHES)
    assert report.ok, str(report)
    assert [r.batch_size for r in report.results] == list(CHECK_BATCHES)


# ---- ONNX: both exporters, 1-D/2-D/3-D layers and a whole network --------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_onnx_torchscript_exporter_any_batch(rank, tmp_path):
    export_and_check(layer_stack(rank), sample_shape(rank), tmp_path, dynamo=False)


@pytest.mark.parametrize("rank", [2, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_onnx_dynamo_exporter_any_batch(rank, tmp_path):
    export_and_check(layer_stack(rank), sample_shape(rank), tmp_path, dynamo=True)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_whole_network_any_batch(dynamo, tmp_path):
    model, shape = dy_network()
    export_and_check(model, shape, tmp_path, dynamo=dynamo)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_onnx_exporter_is_seen_as_recording(dynamo, tmp_path):
    """The layers detect an export by tracing or compiling alone (``torch.onnx.is_in_onnx_export`` costs two
    imports per call on the hot path), so both ONNX exporters must show as one of the two."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(dyconv._chunked.tracing_exporting_or_compiling())
            return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probe(), (torch.randn(2, 3),), str(tmp_path / "probe.onnx"), dynamo=dynamo)
    assert seen and all(seen)
    assert not dyconv._chunked.tracing_exporting_or_compiling()


def test_batch_constant_check_catches_batch_folding(tmp_path):
    """The check can fail: the batch-as-groups strategy, forced, bakes the batch into the graph."""
    model = layer_stack(2, strategy="groups")[:6]  # strided dense, depthwise, pointwise
    path = tmp_path / "folded.onnx"
    # exported as other implementations must be: without a dynamic batch axis (with one, it does not export)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn((EXPORT_BATCH, *sample_shape(2))),), str(path), dynamo=False)
    found = onnx_batch_constants(path, EXPORT_BATCH, layer_channels(model))
    assert any("Conv" in f and "group=" in f for f in found), found
    assert any("Reshape" in f or "initializer" in f or "Constant" in f for f in found), found
    # and such a file is wrong at any other batch size
    with pytest.raises(Exception):
        load_exported(path)(torch.randn((3, *sample_shape(2))))


def test_tracing_selects_batch_generic_strategies():
    """Under torch.jit.trace (what the TorchScript-based ONNX exporter runs) only batch-free strategies qualify;
    in eager mode the same shapes use the batch-folding or per-sample strategies."""
    x = torch.randn(4, 8, 9, 9)
    cases = [(torch.randn(4, 8, 8, 3, 3), [1, 1], 1), (torch.randn(4, 8, 1, 3, 3), [1, 1], 8),
             (torch.randn(4, 8, 8, 1, 1), [0, 0], 1)]
    traced = []
    for weight, padding, groups in cases:
        def f(x, weight=weight, padding=padding, groups=groups):
            traced.append(select_strategy(x, weight, padding, groups))
            return x

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(f, x, check_trace=False)
    assert traced == ["unfold", "experts", "matmul"], traced
    assert all(s in BATCH_GENERIC_STRATEGIES for s in traced)
    assert select_strategy(x, cases[0][0], [1, 1], 1) not in BATCH_GENERIC_STRATEGIES


# ---- TorchScript: trace at one batch size, run at others; script; save/load -----------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_trace_runs_at_other_batch_sizes(rank, tmp_path):
    model = layer_stack(rank)
    path = export_torchscript(model, torch.randn((2, *sample_shape(rank))), tmp_path / "traced.pt", method="trace")
    report = check_parity(model, load_exported(path), sample_shape(rank), batch_sizes=(1, 2, 5, 7))
    assert report.ok, str(report)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_script_save_load_round_trip(rank, tmp_path):
    model = layer_stack(rank)
    path = export_torchscript(model, None, tmp_path / "scripted.pt", method="script")
    loaded = torch.jit.load(str(path))
    report = check_parity(model, loaded, sample_shape(rank), batch_sizes=CHECK_BATCHES)
    assert report.ok, str(report)
    # the temperature survives the round trip as part of the state
    assert float(loaded.state_dict()["0.temperature"]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["script", "trace"])
def test_torchscript_whole_network(method, tmp_path):
    model, shape = dy_network()
    path = export_torchscript(model, torch.randn(2, *shape), tmp_path / f"{method}.pt", method=method)
    report = check_parity(model, load_exported(path), shape, batch_sizes=CHECK_BATCHES)
    assert report.ok, str(report)


# ---- torch.fx ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fx_symbolic_trace_keeps_dynamic_layers_as_leaves(rank):
    model = layer_stack(rank)
    gm = symbolic_trace(model)
    called = [dict(model.named_modules())[n.target] for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, DYNAMIC_CONV_TYPES) for m in called) == 5
    report = check_parity(model, gm, sample_shape(rank), batch_sizes=CHECK_BATCHES)
    assert report.ok, str(report)


def test_fx_plain_tracing_fails_without_leaves():
    """Why the tracer exists: the layer's Python shape checks cannot be traced symbolically."""
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.Tracer().trace(layer_stack(2))
    assert isinstance(DynamicConvTracer().trace(layer_stack(2)), torch.fx.Graph)


@pytest.mark.slow
def test_fx_whole_network():
    model, shape = dy_network()
    report = check_parity(model, symbolic_trace(model), shape, batch_sizes=(1, 3))
    assert report.ok, str(report)


def test_fx_torchvision_feature_extractor():
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    from dyconv.export import FX_LEAF_MODULES

    model = layer_stack(2)
    extractor = fe.create_feature_extractor(model, return_nodes={"4": "features"},
                                            tracer_kwargs={"leaf_modules": list(FX_LEAF_MODULES)})
    x = torch.randn((3, *sample_shape(2)))
    with torch.no_grad():
        expected = model[:5](x)
    torch.testing.assert_close(extractor(x)["features"], expected)


# ---- the helpers themselves --------------------------------------------------------------------------------

def test_check_parity_reports_a_mismatch():
    model = layer_stack(2)
    report = check_parity(model, lambda x: model(x) + 1e-3, sample_shape(2), batch_sizes=(1, 2))
    assert not report.ok and "MISMATCH" in str(report)
    assert all(abs(r.max_abs_error - 1e-3) < 1e-5 for r in report.results)
    report = check_parity(model, lambda x: model(x)[:1], sample_shape(2), batch_sizes=(2,))
    assert not report.ok and not report.results[0].shape_ok


def test_argument_errors(tmp_path):
    model = layer_stack(2)
    with pytest.raises(ValueError, match="Received: input shape \\[1, 3, 8, 8\\]"):
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="Received: list"):
        export_onnx(model, [torch.randn(2, 3, 8, 8)], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="Received: method='compile'"):
        export_torchscript(model, None, tmp_path / "m.pt", method="compile")
    with pytest.raises(ValueError, match="Received: example_input=None"):
        export_torchscript(model, None, tmp_path / "m.pt", method="trace")
    with pytest.raises(ValueError, match="Received: format='tflite'"):
        load_exported(tmp_path / "m.pt", format="tflite")
    with pytest.raises(ValueError, match="Received: batch_sizes=\\(0,\\)"):
        check_parity(model, model, sample_shape(2), batch_sizes=(0,))
    with pytest.raises(ValueError, match="Received: batch_size=1"):
        onnx_batch_constants(onnx.ModelProto(), 1)
