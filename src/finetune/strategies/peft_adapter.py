"""Shared by strategies that inject adapters with Hugging Face peft (lora, and a user's own: LoHa, ...): peft wraps the
chosen backbone layers in place, only the adapters' parameters (and the head) train, every base weight and buffer
stays bitwise the pretrained one (BatchNorm in eval mode), so the adapter alone, a small file, plus the pretrained
backbone is the whole fine-tuned model. A subclass says which peft config to build for the target layers."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from finetune.errors import ConfigError
from finetune.strategies.backbone_subset import BackboneSubset

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"


def require_peft(strategy: str):
    try:
        import peft
    except ImportError:
        raise ConfigError(f"strategy={strategy} needs the peft library: pip install 'finetune[peft]'") from None
    return peft


def is_pointwise_or_linear(layer: nn.Module) -> bool:
    """The `auto` targets: every Linear (a ViT's qkv, proj, fc1, fc2) and every ungrouped 1x1 convolution (a conv
    net's pointwise projections)."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


class PeftAdapter(BackboneSubset):
    adapts = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layer types the adapter can wrap and merge into

    def __init__(self, target_modules: str | list[str] = "auto"):
        super().__init__(freeze_bn_stats=True)  # the pretrained statistics are part of "the pretrained backbone"
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self._peft_model = None

    def adapter_config(self, targets: list[str]):
        """The peft config (LoraConfig, LoHaConfig, ...) for the backbone layers named in `targets`."""
        raise NotImplementedError

    # -- targets -----------------------------------------------------------------------------------------------
    def target_layers(self, backbone: nn.Module) -> list[str]:
        """`target_modules` resolved to backbone layer names: auto, a regex matched against the full name (as peft
        does for a string), or names matched exactly or as a dotted suffix (as peft does for a list)."""
        layers = dict(backbone.named_modules())
        spec = self.target_modules
        if spec == "auto":
            names = [n for n, layer in layers.items() if is_pointwise_or_linear(layer)]
        elif isinstance(spec, str):
            try:
                pattern = re.compile(spec)
            except re.error as err:
                raise ConfigError(f"strategy.target_modules={spec!r} is neither auto nor a valid regex ({err}); "
                                  f"give auto, a list of layer names, or a regex") from None
            names = [n for n in layers if n and pattern.fullmatch(n)]
        else:
            names = [n for n in layers if n and any(n == t or n.endswith(f".{t}") for t in spec)]
        if not names:
            examples = ", ".join([n for n, layer in layers.items() if isinstance(layer, self.adapts)][:4]) or "none"
            raise ConfigError(f"strategy.target_modules={spec!r} matches no layer of backbone {type(backbone).__name__}"
                              f"; layers {self.name} can adapt include: {examples}")
        for name in names:
            self.check_target(name, layers[name])
        return names

    def check_target(self, name: str, layer: nn.Module) -> None:
        kinds = ", ".join(t.__name__ for t in self.adapts)
        if not isinstance(layer, self.adapts):
            raise ConfigError(f"{self.name} cannot adapt backbone layer {name} ({type(layer).__name__}): it adapts "
                              f"{kinds}; leave it out of strategy.target_modules")
        if getattr(layer, "groups", 1) > 1:
            kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
            raise ConfigError(f"{self.name} cannot adapt backbone layer {name}: a {kind} convolution "
                              f"(groups={layer.groups}), which peft cannot merge into plain weights; leave it out of "
                              f"strategy.target_modules (auto takes every Linear and ungrouped 1x1 convolution)")

    # -- the strategy ------------------------------------------------------------------------------------------
    def prepare(self, module) -> None:
        peft = require_peft(self.name)
        targets = self.target_layers(module.backbone)
        # adapters are injected in place: module.backbone stays the backbone, its targets now peft layers whose
        # base weights are the pretrained tensors (keys `<layer>.base_layer.weight`, `<layer>.lora_A.default.weight`)
        self._peft_model = peft.get_peft_model(module.backbone, self.adapter_config(targets))
        super().prepare(module)

    def selects(self, layer_name, layer, param_name) -> bool:
        return self._peft_model.base_model.prefix in layer_name

    # -- the adapter -------------------------------------------------------------------------------------------
    def merge(self, module) -> nn.Module:
        """Fold the adapters into the base weights, in place: module.backbone becomes the plain model again (its
        state_dict loads into timm.create_model), for inference and export; the strategy no longer applies to it."""
        module.backbone = self._peft_model.merge_and_unload()
        self._peft_model = None
        return module.backbone

    def plain_backbone(self, module) -> nn.Module:
        return self.merge(module) if self._peft_model is not None else module.backbone

    def save_adapter(self, module, folder: str | Path) -> Path:
        """peft's adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained(backbone, folder) loads
        them without this package), and the head in head.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self._peft_model.save_pretrained(str(folder))
        save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()}, folder / HEAD_FILE)
        return folder

    def load_adapter(self, module, folder: str | Path) -> None:
        """Put a saved adapter and head onto a module built with this strategy on the pretrained backbone."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        result = set_peft_model_state_dict(self._peft_model, load_file(folder / "adapter_model.safetensors"))
        missing = [k for k in result.missing_keys if self._peft_model.base_model.prefix in k]
        if result.unexpected_keys or missing:
            raise ConfigError(f"the adapter in {folder} does not fit this backbone's targets (unexpected: "
                              f"{result.unexpected_keys[:3]}, missing: {missing[:3]})")
        module.head.load_state_dict(load_file(folder / HEAD_FILE))

    def write_outputs(self, module, output_dir: Path) -> dict:
        folder = self.save_adapter(module, Path(output_dir) / ADAPTER_DIR)
        return {"adapter": str(folder), "adapter_bytes": sum(p.stat().st_size for p in folder.iterdir())}
