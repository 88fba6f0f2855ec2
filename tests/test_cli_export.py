"""``dyconv export``: exports, re-loads, compares against eager and says so."""

import pytest

from dyconv.cli import main

pytest.importorskip("onnxruntime")


def test_export_registry_model_to_onnx(tmp_path, capsys):
    out = tmp_path / "cnn.onnx"
    code = main(["export", "--model", "dy_cnn1d", "--model-kwargs", "num_classes=10", "--format", "onnx",
                 "--exporter", "torchscript", "--output", str(out), "--batch-size", "1", "4"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file()
    assert "input (batch, 1, 40)" in text  # the registry's reference input for dy_cnn1d
    assert "OK: the re-loaded file matches eager at batch sizes 1, 4" in text
    assert text.count(" ok") == 2


def test_export_checkpoint_to_torchscript(tmp_path, capsys):
    import torch

    from dyconv.checkpoint import save_checkpoint
    import dyconv

    model = dyconv.create_model("dy_cnn1d", num_classes=10, in_channels=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not a freshly initialised model
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model_name="dy_cnn1d",
                           model_kwargs={"num_classes": 10, "in_channels": 2})
    out = tmp_path / "cnn.pt"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--method", "trace",
                 "--output", str(out), "--input-size", "2", "40"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "OK: the re-loaded file matches eager at batch sizes 1, 3, 7" in text
    loaded = torch.jit.load(str(out))
    x = torch.randn(5, 2, 40)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_export_rejects_kwargs_with_checkpoint(tmp_path):
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path), "--model-kwargs", "a=1", "--format", "onnx",
              "--output", str(tmp_path / "x.onnx")])
