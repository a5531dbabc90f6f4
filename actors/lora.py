"""LoRA naming shared by the trainer and the export: which modules get adapters,
and how FSDP/peft parameter names map to an adapter and to peft's file names."""

from __future__ import annotations


def language_targets(model, names: list[str]) -> list[str]:
    """Full module paths of the language model's target modules (not the vision tower's)."""
    return [n for n, _ in model.named_modules()
            if n.split(".")[-1] in names and ".visual." not in f".{n}."]


def adapter_of(name: str) -> str | None:
    """The LoRA adapter a parameter belongs to (``...lora_A.<adapter>.weight``), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def peft_name(name: str, adapter: str = "default") -> str:
    """FSDP/peft state-dict name -> peft adapter-file name (no adapter segment)."""
    return name.replace(f".{adapter}.", ".") if adapter_of(name) == adapter else name
