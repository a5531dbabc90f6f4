"""Model references: a hub id, a local folder, or ``tiny://<family>?sizes``."""

from __future__ import annotations

from pathlib import Path

from actors.tiny import build_tiny


def resolve_model(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` and vLLM accept.

    ``tiny://`` references are built (or found in the cache) here, so every
    node of a cluster can resolve the same reference without shared storage.
    Local folders become absolute paths; anything else is taken as a hub id.
    """
    if not ref:
        raise ValueError("model reference is empty: give a hub id, a local folder or tiny://qwen2.5-vl")
    if ref.startswith("tiny://"):
        return str(build_tiny(ref))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {path} has no config.json: is it a Hugging Face checkpoint?")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise ValueError(f"model folder {ref} does not exist")
    return ref
