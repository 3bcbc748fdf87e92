"""Names of model parts, resolved in one place: what `strategy.modules`, `optimizer.lr_mult`, a phase's `train` and
`lr_mult`, the audit and the resume check mean by a name.

Config names are written relative to the model: `head` is the classifier head this project adds, `backbone` the
whole backbone, and any other name a backbone part (`blocks.6`, `conv_head`, or the backbone's own `head.norm` on
ConvNeXt) that lives at `backbone.<name>`. Matching happens on full module-level names (`backbone.head.norm.weight`),
so the classifier `head` never matches a backbone part that timm happens to call `head`.
"""

from __future__ import annotations

from collections.abc import Iterable

OWN_PARTS = ("head", "backbone")


def is_under(name: str, prefix: str) -> bool:
    """`name` is `prefix` or lies inside it (dotted: `blocks.1` is not under `blocks.10`)."""
    return name == prefix or name.startswith(prefix + ".")


def under_any(name: str, prefixes: Iterable[str]) -> bool:
    return any(is_under(name, prefix) for prefix in prefixes)


def nested(a: str, b: str) -> bool:
    """One of the two lies inside the other."""
    return is_under(a, b) or is_under(b, a)


def longest_prefix(name: str, prefixes: Iterable[str]) -> str | None:
    """The most specific of `prefixes` that `name` lies under, or None."""
    matches = [p for p in prefixes if is_under(name, p)]
    return max(matches, key=len) if matches else None


def module_path(part: str) -> str:
    """A config part name -> its full module-level name: `head` and `backbone` are themselves, `backbone.x` stays,
    anything else is a backbone part."""
    return part if part in OWN_PARTS or part.startswith("backbone.") else f"backbone.{part}"


def part_for(full_name: str, parts: Iterable[str]) -> str | None:
    """The config part (as written) that holds the module-level `full_name` most specifically, or None."""
    by_path = {module_path(part): part for part in parts}
    match = longest_prefix(full_name, by_path)
    return by_path[match] if match is not None else None


def relative_name(name: str) -> str:
    """A module-level parameter name as the configs write parts: `backbone.blocks.6.x` -> `blocks.6.x`."""
    return name[len("backbone."):] if name.startswith("backbone.") else name
