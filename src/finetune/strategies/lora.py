"""lora: low-rank adapters (Hu et al., ICLR 2022) through Hugging Face peft on the backbone's target layers (default
`auto`: every Linear, i.e. a ViT's attention qkv/proj and MLP fc1/fc2, and every ungrouped 1x1 convolution, i.e. a
conv net's pointwise projections); each target's output gains (alpha / r) * B(A(x)), with B starting at zero so
training starts from the pretrained model. Only A, B and the head train; base weights and BatchNorm statistics stay
bitwise pretrained. `merge` folds the adapters into plain weights; the adapter alone is a small file (run dir
`adapter/`)."""

from __future__ import annotations

from finetune.errors import ConfigError
from finetune.strategies.peft_adapter import PeftAdapter, require_peft


class LoRA(PeftAdapter):
    name = "lora"
    chooses = "layer for LoRA"

    def __init__(self, target_modules: str | list[str] = "auto", r: int = 8, alpha: float = 16,
                 dropout: float = 0.0):
        super().__init__(target_modules)
        if not (int(r) >= 1 and float(alpha) > 0 and 0 <= float(dropout) < 1):
            raise ConfigError(f"strategy.r={r}, alpha={alpha}, dropout={dropout}: lora needs r >= 1 (an integer), "
                              f"alpha > 0 and 0 <= dropout < 1")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)

    def adapter_config(self, targets: list[str]):
        return require_peft(self.name).LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                                  target_modules=targets, bias="none")
