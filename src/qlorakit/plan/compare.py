"""``qlorakit plan --compare A B``: what LoRA can tune in each model, side by side at the same LoRA settings.

For each model: its decoder layers, hidden size and MLP (feed-forward) shapes, then the LoRA trainable parameters
of every adapted linear layer (r x (in + out) each: A is r x in, B is out x r), by layer kind (attention, MLP), per
decoder layer and in the whole model. It answers the question the MPT-30B model card qlorakit started from asked:
"Perhaps there are fewer forward layers that can be tuned?"
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.memory import Architecture, Linear, architecture, lora_targets

KINDS = {"attn_in": "attention", "attn_out": "attention", "mlp_in": "MLP", "mlp_mid": "MLP"}
MLP_TYPES = {"llama": "SwiGLU (gate, up, down)", "mpt": "GELU (up, down)"}


@dataclass(frozen=True)
class Tunable:
    """What LoRA at rank ``r`` on ``targets`` trains in one model."""

    name: str
    arch: Architecture
    targets: tuple[Linear, ...]
    r: int

    def params(self, lin: Linear) -> int:
        """LoRA parameters of one adapted linear layer in one decoder layer."""
        return self.r * (lin.in_features + lin.out_features)

    def per_kind(self, kind: str) -> int:
        return sum(self.params(lin) for lin in self.targets if KINDS[lin.reads] == kind)

    def per_layer(self) -> int:
        return sum(self.params(lin) for lin in self.targets)

    def total(self) -> int:
        return self.arch.layers * self.per_layer()

    def mlp_total(self) -> int:
        return self.arch.layers * self.per_kind("MLP")

    def mlp_matrices(self) -> int:
        """Adapted feed-forward (MLP) weight matrices in the whole model."""
        return self.arch.layers * sum(1 for lin in self.targets if KINDS[lin.reads] == "MLP")


def tunable(name: str, config: dict, r: int, lora_modules: str) -> Tunable:
    arch = architecture(config)
    return Tunable(name, arch, lora_targets(arch, lora_modules), r)


def rows(models: list[Tunable]) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) in table order; a label without cells is a section title ("" a blank line)."""
    def each(f) -> list[str]:
        return [f(m) for m in models]

    out = [("decoder layers", each(lambda m: f"{m.arch.layers}")),
           ("hidden size", each(lambda m: f"{m.arch.hidden:,}")),
           ("MLP width", each(lambda m: f"{m.arch.ffn:,}")),
           ("MLP", each(lambda m: MLP_TYPES[m.arch.family])),
           ("", []), ("LoRA parameters per decoder layer (shape: parameters)", [])]
    for kind in ("attention", "MLP"):
        names = list(dict.fromkeys(x.name for m in models for x in m.targets if KINDS[x.reads] == kind))
        for name in names:
            def cell(m, name=name):
                lin = next((x for x in m.targets if x.name == name), None)
                return "-" if lin is None else f"{lin.in_features}x{lin.out_features}: {m.params(lin):,}"
            out.append((f"  {name}", each(cell)))
        out.append((f"  {kind}, all", each(lambda m, kind=kind: f"{m.per_kind(kind):,}")))
    out += [("  every adapted layer", each(lambda m: f"{m.per_layer():,}")),
            ("", []), ("LoRA parameters in the model", []),
            ("  attention", each(lambda m: f"{m.arch.layers * m.per_kind('attention'):,}")),
            ("  MLP", each(lambda m: f"{m.mlp_total():,}")),
            ("  all", each(lambda m: f"{m.total():,}")),
            ("adapted MLP matrices", each(lambda m: f"{m.mlp_matrices()}"))]
    return out


def format_comparison(models: list[Tunable], lora_modules: str) -> str:
    r = models[0].r
    table = rows(models)
    label_w = max(len(label) for label, cells in table if cells)
    widths = [max(len(m.name), *(len(cells[i]) for _, cells in table if cells)) for i, m in enumerate(models)]
    lines = [f"LoRA r={r} on {'all linear layers' if lora_modules.strip() == 'all' else lora_modules} "
             "(r x (in + out) trainable parameters per adapted linear layer)", "",
             " " * label_w + "".join(f"  {m.name:>{w}}" for m, w in zip(models, widths))]
    for label, cells in table:
        lines.append((f"{label:<{label_w}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths))).rstrip())
    if len(models) == 2:
        a, b = models
        lines += ["", f"{a.name}: {a.arch.layers} layers x {a.mlp_matrices() // a.arch.layers} adapted MLP matrices = "
                      f"{a.mlp_matrices()}; {b.name}: {b.arch.layers} x {b.mlp_matrices() // b.arch.layers} = "
                      f"{b.mlp_matrices()}.",
                  f"{a.name}'s LoRA trains {a.total() / 1e6:.1f}M parameters ({a.mlp_total() / 1e6:.1f}M in MLPs), "
                  f"{a.total() / b.total():.0%} of {b.name}'s {b.total() / 1e6:.1f}M ({b.mlp_total() / 1e6:.1f}M)."]
    return "\n".join(lines)
