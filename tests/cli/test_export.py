from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cvft.cli import main
from cvft.tasks import ImageClassifier


@pytest.fixture
def trained_lora_adapter(tmp_path):
    base = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=4).state_dict().items()},
              str(base))  # fmt: skip
    model = ImageClassifier("test_vit", pretrained=False, weights=str(base), class_names=["a", "b", "c"],
                            strategies=[{"name": "lora", "rank": 2, "qkv_parts": ["q", "v"]}])  # fmt: skip
    for name, param in model.backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.eval(), model.save_adapter(tmp_path / "adapter"), base


def test_cvft_export_writes_a_plain_timm_model_with_the_same_outputs(tmp_path, trained_lora_adapter, capsys):
    model, adapter, base = trained_lora_adapter
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    output = tmp_path / "plain.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(adapter), "--weights", str(base), "--output", str(output)])
    assert exit_info.value.code == 0
    plain = timm.create_model("test_vit", num_classes=3).eval()
    plain.load_state_dict(load_file(str(output)), strict=True)
    with torch.no_grad():
        assert (plain(images) - expected).abs().max() < 1e-5
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["backbone"] == "test_vit" and json.loads(metadata["class_names"]) == ["a", "b", "c"]
    assert "wrote" in capsys.readouterr().out


def test_cvft_export_onnx(tmp_path, trained_lora_adapter):
    onnx = pytest.importorskip("onnx")
    _, adapter, base = trained_lora_adapter
    target = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export",
                "--adapter",
                str(adapter),
                "--weights",
                str(base),
                "--output",
                str(tmp_path / "m.safetensors"),
                "--onnx",
                str(target),
            ]
        )  # ONNX at the backbone's native size: no position-embedding resampling
    assert exit_info.value.code == 0
    graph = onnx.load(str(target))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cvft_export_reports_a_missing_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def _randomised(model: ImageClassifier, seed: int = 0) -> ImageClassifier:
    """Give every trainable tensor a non-zero update, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.backbone.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize(
    "strategies",
    [
        [{"name": "ssf", "targets": "vit_all"}],
        [{"name": "sparse", "budget": 0.02}],
        [{"name": "shared_lora", "rank": 2, "targets": "vit_all"}],
        [{"name": "lora", "rank": 2}, {"name": "sparse", "budget": 50}],
    ],
    ids=["ssf", "sparse", "shared_lora", "lora+sparse"],
)
def test_export_folds_every_mergeable_method_into_plain_timm_keys(tmp_path, strategies):
    from cvft.export import export_classifier

    model = _randomised(ImageClassifier("test_vit", pretrained=False, num_classes=3, strategies=strategies))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(images)
    path = export_classifier(model, tmp_path / "plain.safetensors")
    plain = timm.create_model("test_vit", num_classes=3).eval()
    plain.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), expected, rtol=1e-4, atol=1e-5)


def test_export_refuses_methods_that_add_computation_and_names_the_way_out(tmp_path):
    from cvft.errors import CvftError
    from cvft.export import export_classifier

    model = ImageClassifier("test_vit", pretrained=False, num_classes=3, strategies=[{"name": "vpt", "num_tokens": 2}])
    with pytest.raises(CvftError, match=r"visual_prompts.*--onnx"):
        export_classifier(model, tmp_path / "plain.safetensors")
    assert not (tmp_path / "plain.safetensors").exists()


# --------------------------------------------------------------------------- --quantize (torchao)
def test_int8_export_of_a_qat_model_gives_the_weights_it_trained_with(tmp_path):
    pytest.importorskip("torchao")
    from cvft.export_quantized import export_quantized, load_int8_state_dict, quantized_runtime
    from cvft.strategies import apply_strategies
    from cvft.strategies.merge import fold_all

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    apply_strategies(model, ["qat"])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fake_quantized = model(images)
    plain = fold_all(model)  # torchao's convert: float weights back in plain layers
    with torch.no_grad():
        float32 = plain(images)
    report = export_quantized(plain, tmp_path / "m.safetensors", "int8-weight-only", {"backbone": "test_resnet"},
                              images=images, validation=[(images, float32.argmax(1))], repeats=1)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # atomic: no temporary file left
    assert report.file_bytes < 0.5 * report.float_bytes and report.accuracy_float == 1.0
    loaded = timm.create_model("test_resnet", num_classes=3).eval()
    loaded.load_state_dict(load_int8_state_dict(tmp_path / "m.safetensors"), strict=True)  # safetensors: no pickle
    with torch.no_grad():
        # the stored int8 weights are exactly QAT's fake-quantised ones (same torchao primitives)
        torch.testing.assert_close(loaded(images), fake_quantized, rtol=1e-5, atol=1e-5)
        # torchao's int8 runtime (its own Linear kernels) and the float model, within stated tolerances
        torch.testing.assert_close(quantized_runtime(plain, "int8-weight-only")(images), fake_quantized,
                                   rtol=1e-3, atol=1e-3)  # fmt: skip
        assert (loaded(images) - float32).abs().max() < 0.05 * float32.abs().max()


def test_cvft_export_quantize_writes_int8_and_reports(tmp_path, trained_lora_adapter, capsys):
    pytest.importorskip("torchao")
    from safetensors import safe_open

    _, adapter, base = trained_lora_adapter
    output = tmp_path / "int8.safetensors"
    argv = ["export", "--adapter", str(adapter), "--weights", str(base), "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quantize", "int8-dynamic"])
    assert exit_info.value.code == 0
    with safe_open(str(output), "pt") as handle:
        assert handle.metadata()["scheme"] == "int8-dynamic"
        assert handle.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.int8
    out = capsys.readouterr().out
    assert "of float32" in out and "CPU latency" in out


def test_cvft_export_quantize_without_torchao_names_the_extra(tmp_path, trained_lora_adapter, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    _, adapter, base = trained_lora_adapter
    argv = ["export", "--adapter", str(adapter), "--weights", str(base), "--output", str(tmp_path / "q.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quantize", "int8-weight-only"])
    assert exit_info.value.code == 2
    assert 'pip install "cvft[qlora]"' in capsys.readouterr().err
    assert not (tmp_path / "q.safetensors").exists()


def test_cvft_export_quantize_reports_accuracy_on_a_class_folder(tmp_path, trained_lora_adapter, capsys):
    pytest.importorskip("torchao")
    from PIL import Image

    _, adapter, base = trained_lora_adapter
    root = tmp_path / "val"
    generator = torch.Generator().manual_seed(0)
    for name in ("c", "a"):  # a subset of the model's classes, in another order
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    argv = ["export", "--adapter", str(adapter), "--weights", str(base), "--output", str(tmp_path / "q.safetensors")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quantize", "int8-weight-only", "--val-root", str(root)])
    assert exit_info.value.code == 0
    assert "validation accuracy: int8" in capsys.readouterr().out
    (root / "z").mkdir()  # a class the model does not have: a clear error, exit code 2, nothing written
    (root / "z" / "0.png").write_bytes((root / "a" / "0.png").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-1], str(tmp_path / "r.safetensors"), "--quantize", "int8-weight-only", "--val-root", str(root)])
    assert exit_info.value.code == 2
    assert "['z']" in capsys.readouterr().err
    assert not (tmp_path / "r.safetensors").exists()
