"""finetune-export: the weights load into timm/torchvision without this package and give the trained module's
logits; TorchScript and ONNX files take a uint8 batch of any size, normalise inside and agree with the module."""

from __future__ import annotations

import json

import pytest
import torch

from finetune import load_model
from finetune.export import export
from tests.conftest import make_image_folder
from tests.test_cli import run_main
from tests.test_predict import FOLDER, train_tiny


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny timm model fine-tuned with LoRA on image files (lr high enough that the adapters matter)."""
    root = tmp_path_factory.mktemp("export")
    pets = make_image_folder(root / "pets", per_class=6, split_dirs=("train", "val", "test"))
    ckpt, _ = train_tiny(root / "run", *FOLDER, f"data.root={pets}", "strategy=lora", "optimizer.lr=3e-2")
    return ckpt, sorted(str(p) for p in (pets / "test").rglob("*.png"))


def test_state_dict_loads_into_timm_alone_with_the_lora_merged(lora_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    ckpt, paths = lora_run
    spec = export(str(ckpt), "state_dict", tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved == json.loads(json.dumps(spec)) and saved["class_names"] == ["cat", "dog"]
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in trained.items())  # the merge matters
    weights = load_file(tmp_path / "model.safetensors")
    assert not any("lora" in key for key in weights)
    plain = timm.create_model(saved["model_name"], num_classes=saved["num_classes"], **saved["model_kwargs"]).eval()
    plain.load_state_dict(weights, strict=True)
    model = load_model(ckpt, device="cpu")  # the inputs are the test images as the checkpoint preprocesses them
    inputs = model.batch(paths)
    with torch.no_grad():
        assert torch.allclose(plain(inputs), model.logits(inputs), atol=1e-5)
    assert saved["parity_max_abs_logit_diff"] < 1e-5


def test_state_dict_of_a_torchvision_backbone_loads_into_get_model(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    ckpt, _ = train_tiny(tmp_path / "run", "data=fake", "data.num_samples=32", "data.image_size=32",
                         "data.native_size=16", "data.num_classes=3", "backbone=torchvision",
                         "backbone.name=mobilenet_v3_small", "backbone.pretrained=false", "strategy=freeze")
    saved = export(str(ckpt), "state_dict", tmp_path / "out")
    assert saved["library"] == "torchvision" and saved["classifier"] == "classifier.3"
    plain = torchvision.models.get_model("mobilenet_v3_small", num_classes=3).eval()
    plain.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    model = load_model(ckpt, device="cpu")
    inputs = model.batch(list(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)))
    with torch.no_grad():
        assert torch.allclose(plain(inputs), model.logits(inputs), atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_one_file_takes_uint8_batches_of_any_size_and_matches_the_module(lora_run, tmp_path, fmt):
    ckpt, paths = lora_run
    saved = export(str(ckpt), fmt, tmp_path)
    assert saved["parity_max_abs_logit_diff"] < 1e-4 and saved["parity_batch"] == 3  # traced on a batch of 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.json", saved["file"]])  # one file
    model = load_model(ckpt, device="cpu")
    from PIL import Image

    pixels = torch.stack([model.preprocess.geometry(Image.open(p).convert("RGB")) for p in paths[:5]])
    assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (3, 32, 32)
    expected = model.logits(model.batch(paths[:5]))
    if fmt == "torchscript":
        logits = torch.jit.load(str(tmp_path / "model.torchscript.pt"))(pixels)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"images": pixels.numpy()})[0])
    assert torch.allclose(logits, expected, atol=1e-4)


def test_export_mistakes_are_one_line(lora_run, tmp_path):
    ckpt, _ = lora_run
    result = run_main("finetune.export", f"ckpt_path={ckpt}", "format=tflite", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "format='tflite'; choose one of: state_dict, torchscript, onnx" in result.stderr
    mlp, _ = train_tiny(tmp_path / "mlp", "data=fake", "data.num_samples=32", "data.image_size=32",
                        "data.native_size=16", "head=mlp")
    result = run_main("finetune.export", f"ckpt_path={mlp}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2 and "head is MLPHead: use format=torchscript or format=onnx" in result.stderr
