"""full: the baseline. Every parameter of backbone and head trains; BatchNorm trains as usual; the optimizer sees
everything. Costs the most compute and activation memory (the whole backbone's graph is kept for backward)."""

from finetune.strategies.base import FreezingStrategy


class FullFinetune(FreezingStrategy):
    name = "full"
