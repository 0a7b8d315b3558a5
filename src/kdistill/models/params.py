"""A model's parameter tree: counts and shares per module, to a chosen depth (``kdistill params``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParamRow:
    """One module of the tree: its path, depth, class, parameter count, share of the whole, trainable count."""

    path: str
    depth: int
    kind: str
    params: int
    share: float
    trainable: int


def parameter_tree(model: nn.Module, max_depth: int = 2) -> list[ParamRow]:
    """Rows for the model and its submodules down to ``max_depth``; shared parameters are counted once."""
    total = _count(model, trainable_only=False) or 1
    rows = [ParamRow("(total)", 0, type(model).__name__, total, 1.0, _count(model, trainable_only=True))]

    def walk(module: nn.Module, prefix: str, depth: int) -> None:
        if depth > max_depth:
            return
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            count = _count(child, trainable_only=False)
            if count == 0:
                continue
            rows.append(ParamRow(path, depth, type(child).__name__, count, count / total,
                                 _count(child, trainable_only=True)))  # fmt: skip
            walk(child, path, depth + 1)

    walk(model, "", 1)
    return rows


def _count(module: nn.Module, trainable_only: bool) -> int:
    seen: set[int] = set()
    count = 0
    for param in module.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        count += param.numel()
    return count


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def format_parameter_tree(rows: list[ParamRow]) -> str:
    """The tree as aligned text: indented path, class, count, share with a bar."""
    width = max(len("  " * max(r.depth - 1, 0) + r.path.rsplit(".", 1)[-1]) for r in rows) + 2
    lines = [f"{'module':<{width}}{'class':<28}{'params':>12}{'share':>8}  "]
    for row in rows:
        label = row.path if row.depth == 0 else "  " * (row.depth - 1) + row.path.rsplit(".", 1)[-1]
        bar = "█" * round(row.share * 20)
        lines.append(f"{label:<{width}}{row.kind[:27]:<28}{_human(row.params):>12}{row.share:>8.1%}  {bar}")
    frozen = rows[0].params - rows[0].trainable
    lines.append(f"total {rows[0].params:,} parameters ({_human(rows[0].params)}), {frozen:,} frozen")
    return "\n".join(lines)
