"""finetune-export: a trained model as files that run without this package.

- `state_dict`: model.safetensors for `timm.create_model(name, num_classes=K)` or
  `torchvision.models.get_model(name, num_classes=K)` (the head becomes the model's own classifier);
- `torchscript` / `onnx`: one file that takes a uint8 RGB batch [B, 3, S, S] (any B) with the normalisation inside
  and returns logits [B, K].

Beside each, model.json holds the class names, the preprocessing (finetune.data.preprocessing: how an image becomes
that batch) and how to load the file. LoRA adapters are merged into the weights first. Every export runs the
exported model on a sample batch and records how far its logits are from the trained module's (`parity`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from finetune.classifier import load_module
from finetune.config import CONFIG_DIR
from finetune.run.failures import report_user_errors
from finetune.data.preprocessing import normalisation_tensors, to_model_input
from finetune.errors import ConfigError
from finetune.heads import LinearHead
from finetune.module import FinetuneModule

log = logging.getLogger("finetune")
FORMATS = ("state_dict", "torchscript", "onnx")
FILE_NAMES = {"state_dict": "model.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
# the backbone keys of a run config that are not the model's own keyword arguments
NOT_MODEL_KWARGS = ("_target_", "name", "pretrained", "checkpoint_path", "weights")


class ImagesToLogits(nn.Module):
    """uint8 RGB [B, 3, S, S] -> logits [B, K]: the normalisation, the backbone and the head in one graph."""

    def __init__(self, network: nn.Module, preprocessing: dict):
        super().__init__()
        self.network, self.preprocessing = network, preprocessing
        mean, std = normalisation_tensors(preprocessing)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(to_model_input(images, self.preprocessing, self.mean, self.std))


def sample_images(preprocessing: dict, batch: int, seed: int = 0) -> torch.Tensor:
    """A fixed uint8 batch at the model's input size, for parity checks."""
    size = preprocessing["image_size"]
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_logits(module: FinetuneModule, images: torch.Tensor) -> torch.Tensor:
    mean, std = normalisation_tensors(module.preprocessing)
    with torch.no_grad():
        return module(to_model_input(images, module.preprocessing, mean, std))


def plain_network(module: FinetuneModule) -> nn.Module:
    """backbone + head as plain modules in eval mode (LoRA merged into the backbone)."""
    return nn.Sequential(module.strategy.plain_backbone(module), module.head).eval()


def model_kwargs(run_config: dict) -> dict:
    return {k: v for k, v in run_config["backbone"].items() if k not in NOT_MODEL_KWARGS}


def library_model(module: FinetuneModule) -> tuple[str, str, nn.Module, str]:
    """(library, model name, that library's classifier built for this run's classes, its classifier's name)."""
    import timm

    kwargs, num_classes = model_kwargs(module.run_config), len(module.class_names)
    if module.backbone_name.startswith("torchvision/"):
        import torchvision

        from finetune.backbones.torchvision import classifier_name

        name = module.backbone_name.removeprefix("torchvision/")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return "torchvision", name, model, classifier_name(model)
    if module.backbone_name.split(".")[0] not in timm.list_models():
        raise ConfigError(f"format=state_dict writes timm or torchvision models, and backbone "
                          f"{module.backbone_name!r} is neither; use format=torchscript or format=onnx")
    model = timm.create_model(module.backbone_name, pretrained=False, num_classes=num_classes, **kwargs)
    classifier = model.get_classifier()
    return "timm", module.backbone_name, model, next(n for n, m in model.named_modules() if m is classifier)


def export_state_dict(module: FinetuneModule, folder: Path, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    from safetensors.torch import save_file

    if not isinstance(module.head, LinearHead):
        raise ConfigError(f"format=state_dict writes a timm/torchvision classifier, whose head is one Linear layer; "
                          f"this run's head is {type(module.head).__name__}: use format=torchscript or format=onnx")
    library, name, model, classifier = library_model(module)
    linear = module.head[-1]
    weights = {**module.strategy.plain_backbone(module).state_dict(),
               f"{classifier}.weight": linear.weight, f"{classifier}.bias": linear.bias}
    model.load_state_dict(weights, strict=True)  # every tensor has its place in the library's own model
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / FILE_NAMES["state_dict"])
    num_classes, kwargs = len(module.class_names), model_kwargs(module.run_config)
    build = (f"timm.create_model({name!r}, num_classes={num_classes}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
             if library == "timm" else f"torchvision.models.get_model({name!r}, num_classes={num_classes})")
    spec = {"library": library, "model_name": name, "num_classes": num_classes, "model_kwargs": kwargs,
            "classifier": classifier, "input": "float [B, 3, S, S], normalised with preprocessing.mean/std",
            "load": f"model = {build}; model.load_state_dict(safetensors.torch.load_file('model.safetensors'))"}
    with torch.no_grad():
        logits = ImagesToLogits(model.eval(), module.preprocessing)(images)
    return spec, logits


def export_torchscript(module: FinetuneModule, folder: Path, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
    wrapped = ImagesToLogits(plain_network(module), module.preprocessing).eval()
    path = folder / FILE_NAMES["torchscript"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice: TorchScript is what this format is
        torch.jit.trace(wrapped, images[:2]).save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        logits = loaded(images)  # another batch size than traced: the batch dimension is free
    return {"input": "uint8 RGB [B, 3, S, S]", "load": "model = torch.jit.load('model.torchscript.pt')"}, logits


def export_onnx(module: FinetuneModule, folder: Path, images: torch.Tensor, opset: int) -> tuple[dict, torch.Tensor]:
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"format=onnx needs the {package} package: pip install 'finetune[onnx]'") from None
    wrapped = ImagesToLogits(plain_network(module), module.preprocessing).eval()
    path = folder / FILE_NAMES["onnx"]
    # one file, weights inside, unless they pass protobuf's 2 GB limit (then model.onnx.data goes beside it)
    weight_bytes = sum(t.numel() * t.element_size() for t in wrapped.state_dict().values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (images[:2],), str(path), dynamo=True, opset_version=opset,
                          external_data=weight_bytes > 1_800_000_000,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
    spec = {"input": "uint8 RGB [B, 3, S, S] named 'images'", "output": "logits [B, K] named 'logits'",
            "opset": opset, "load": "onnxruntime.InferenceSession('model.onnx').run(None, {'images': batch})"}
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file is written but its parity is not checked")
        return spec, None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return spec, torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def export(ckpt_path: str, fmt: str, folder: Path, opset: int = 18, parity_batch: int = 3) -> dict:
    """Write the model of `ckpt_path` in format `fmt` into `folder`; returns what model.json says."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}; choose one of: {', '.join(FORMATS)}")
    module = load_module(ckpt_path)
    images = sample_images(module.preprocessing, parity_batch)
    expected = reference_logits(module, images)  # before a LoRA merge changes the module
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        spec, logits = export_state_dict(module, folder, images)
    elif fmt == "torchscript":
        spec, logits = export_torchscript(module, folder, images)
    else:
        spec, logits = export_onnx(module, folder, images, opset)
    file = folder / FILE_NAMES[fmt]
    parity = None if logits is None else float((logits.float() - expected).abs().max())
    description = {"format": fmt, "file": file.name, "bytes": file.stat().st_size, "checkpoint": str(ckpt_path),
                   "strategy": module.strategy.name, "class_names": module.class_names,
                   "preprocessing": module.preprocessing, **spec, "output": spec.get("output", "logits [B, K]"),
                   "parity_max_abs_logit_diff": parity, "parity_batch": parity_batch}
    (folder / "model.json").write_text(json.dumps(description, indent=1))
    if parity is not None and parity > 1e-3:
        log.warning("the exported model's logits differ from the trained module's by up to %.2e", parity)
    return description


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@report_user_errors
def main(cfg: DictConfig) -> None:
    folder = Path(cfg.paths.output_dir)
    description = export(cfg.ckpt_path, cfg.format, folder, cfg.opset)
    parity = description["parity_max_abs_logit_diff"]
    print(f"exported {cfg.format}: {folder / description['file']} ({description['bytes'] / 1e6:.1f} MB) + model.json; "
          f"max |logit difference| to the trained module: {'unchecked' if parity is None else f'{parity:.2e}'}")


if __name__ == "__main__":
    main()
