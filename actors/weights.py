"""Weight-sync protocol between trainer ranks and generation engines.

The trainer turns its full tensors into *buckets*, the driver (or the pool)
puts every bucket in the Ray object store once, and each engine streams the
buckets back into torch tensors and loads them into its live model::

    buckets = make_buckets(model.state_dict().items(), bucket_bytes=256 << 20)
    manifest = WeightVersion.of(buckets, version=7)
    refs = put_buckets(buckets)                       # one ray.put per bucket
    ...                                               # inside the engine:
    for name, tensor in iter_refs_tensors(refs): ...  # zero-copy views

A bucket is a ``list[tuple[str, np.ndarray]]`` of up to ``bucket_bytes``
bytes (a single larger tensor gets a bucket of its own), in the order given,
so that the tensors of one layer travel together (vLLM's layerwise reload
processes a layer as soon as all its tensors arrived).

Zero copy: ``make_buckets`` returns numpy views of the CPU tensors' storage
(a copy only for GPU or non-contiguous tensors); ``ray.put`` then makes the
one copy into shared memory, and ``ray.get`` on the same node returns
read-only views of that shared memory, which ``iter_bucket_tensors`` wraps
with ``torch.from_numpy`` without copying. The engine's loader copies them
into its own parameters, so nothing writes to the views.

dtypes: numpy has no bfloat16 (nor float8). Such a tensor travels as its raw
bytes viewed as a one-field structured numpy dtype whose field name is the
torch dtype, e.g. ``np.dtype([("bfloat16", "<i2")])``. The tag thus lives in
the array's own dtype (it survives pickling and ``ray.put``, and costs no
copy), and ``to_torch`` restores it with ``tensor.view(torch.bfloat16)``.
Every other dtype travels as the matching plain numpy dtype.

Names are Hugging Face names: what ``model.state_dict()`` of
``AutoModelForImageTextToText`` gives in transformers 5, which is what the
FSDP trainer holds:

- Qwen3-VL: ``model.language_model.*``, ``model.visual.*``, ``lm_head.*``,
  identical to the names in the saved safetensors.
- Qwen2-VL and Qwen2.5-VL: the same state_dict names, but transformers 5
  *saves* these two families with their original (pre-4.52) names:
  ``model.language_model.X`` is written as ``model.X`` and
  ``model.visual.X`` as ``visual.X`` (``lm_head.*`` unchanged).
vLLM's Qwen2/2.5/3-VL ``load_weights`` accept the state_dict names (their
``hf_to_vllm_mapper`` maps ``model.language_model.`` and ``model.visual.``),
and for Qwen2/2.5-VL also the saved names. The engine checks an update
against the model's state_dict names (or, failing that, the saved names)
before loading anything, because a bad name or shape half-way through a
reload leaves vLLM's model with meta tensors it cannot recover from.

LoRA adapters travel as an *adapter payload*: ``{"config": adapter_config
dict, "bucket": bucket of peft tensors}`` (see ``adapter_payload``), the
tensor names being peft's saved names
(``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

Bucket = list[tuple[str, np.ndarray]]

# torch dtypes numpy cannot hold -> the integer type of the same width carrying their bytes.
_RAW_DTYPES: dict[torch.dtype, tuple[torch.dtype, str]] = {
    torch.bfloat16: (torch.int16, "<i2"),
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _RAW_DTYPES[getattr(torch, _name)] = (torch.uint8, "u1")
_BY_TAG = {str(dt).removeprefix("torch."): (dt, raw) for dt, (raw, _) in _RAW_DTYPES.items()}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU numpy array with the tensor's bytes (a view when possible)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        # full_tensor() is a collective: the trainer must call it on every rank itself.
        raise TypeError("pass full tensors (DTensor.full_tensor() on every rank), not DTensor shards")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()  # no-op (same storage) when already contiguous
    if t.dtype in _RAW_DTYPES:
        raw, np_raw = _RAW_DTYPES[t.dtype]
        tag = str(t.dtype).removeprefix("torch.")
        return t.view(raw).numpy().view(np.dtype([(tag, np_raw)]))
    return t.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """Inverse of ``to_numpy``: a tensor sharing the array's memory, original dtype restored."""
    names = array.dtype.names
    with warnings.catch_warnings():
        # Arrays from ray.get are read-only views of shared memory; the loader only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if names:
            if len(names) != 1 or names[0] not in _BY_TAG:
                raise TypeError(f"unknown structured dtype {array.dtype} in a weight bucket")
            dtype, raw = _BY_TAG[names[0]]
            return torch.from_numpy(array.view(array.dtype[0])).view(raw).view(dtype)
        return torch.from_numpy(array)


def make_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = 256 << 20) -> list[Bucket]:
    """Group (name, tensor) pairs, in order, into buckets of at most ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Names must
    be unique.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: Bucket = []
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        array = to_numpy(tensor)
        if current and size + array.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, array))
        size += array.nbytes
    if current:
        buckets.append(current)
    return buckets


def put_buckets(buckets: Sequence[Bucket]) -> list:
    """``ray.put`` each bucket once; the refs can be sent to any number of engines."""
    import ray

    return [ray.put(bucket) for bucket in buckets]


def iter_bucket_tensors(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one bucket; tensors share the arrays' memory."""
    for name, array in bucket:
        yield name, to_torch(array)


def iter_refs_tensors(refs: Sequence) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of bucket refs, fetching one bucket at a time.

    Each fetched bucket stays referenced while its tensors are consumed (the
    tensors are views of it).
    """
    import ray

    for ref in refs:
        bucket = ray.get(ref)
        yield from iter_bucket_tensors(bucket)
        del bucket


@dataclass(frozen=True)
class WeightVersion:
    """Manifest of one set of weights: what an engine checks before loading.

    ``shapes`` and ``dtypes`` (torch dtype names) are per name, in bucket
    order; ``checksum`` is optional (blake2b of names and bytes; ~1 GB/s, so
    off by default for large models).
    """

    version: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    total_bytes: int
    checksum: str | None = None

    @classmethod
    def of(cls, buckets: Sequence[Bucket], version: int, checksum: bool = False) -> WeightVersion:
        names, shapes, dtypes, total = [], [], [], 0
        for bucket in buckets:
            for name, array in bucket:
                names.append(name)
                shapes.append(tuple(array.shape))
                dtypes.append(str(to_torch(array).dtype).removeprefix("torch."))
                total += array.nbytes
        return cls(version, tuple(names), tuple(shapes), tuple(dtypes), total,
                   bucket_checksum(buckets) if checksum else None)


def bucket_checksum(buckets: Sequence[Bucket]) -> str:
    """blake2b over every name and the raw bytes of every array, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for bucket in buckets:
        for name, array in bucket:
            digest.update(name.encode())
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def adapter_payload(config: dict, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """A LoRA adapter as one object: peft's adapter_config dict and its tensors as a bucket.

    With a peft model: ``adapter_payload(model.peft_config["default"].to_dict(),
    get_peft_model_state_dict(model).items())``. Sets in the config (peft keeps
    ``target_modules`` as a set) become sorted lists so it serialises as JSON.
    """
    clean = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    [bucket] = make_buckets(named_tensors, bucket_bytes=1 << 62) or [[]]
    payload = {"config": clean, "bucket": bucket}
    check_adapter(payload)
    return payload


def check_adapter(payload: dict) -> None:
    """ValueError for an adapter vLLM would serve differently from peft.

    vLLM applies LoRA to the language model only and silently ignores
    adapter weights on the vision tower. On Qwen2.5-VL the vision MLP is
    named like the text MLP (gate_proj / up_proj / down_proj), so
    ``target_modules=["gate_proj", ...]`` also adapts the vision tower in
    peft, and the engine would then sample from a different policy than the
    trainer's.
    """
    if not payload.get("bucket"):
        raise ValueError("the adapter has no tensors")
    visual = [n for n, _ in payload["bucket"] if ".visual." in n]
    if visual:
        raise ValueError(
            f"{len(visual)} adapter tensors are on the vision tower (e.g. {visual[0]}), which "
            "vLLM does not serve: restrict target_modules to the language model, e.g. "
            "r'.*language_model.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'")


# --------------------------------------------------------------------------
# What an engine accepts
# --------------------------------------------------------------------------


def check_manifest(manifest: WeightVersion, expected: Sequence[dict[str, tuple[int, ...]]],
                   optional: set[str] = frozenset()) -> None:
    """ValueError unless the manifest names exactly one of the ``expected`` name sets.

    ``expected`` is a list of name -> shape dicts (state_dict names, then
    saved names); names in ``optional`` may be left out. Shapes must match.
    """
    got = dict(zip(manifest.names, manifest.shapes))
    problems = []
    for names in expected:
        missing = set(names) - set(got) - set(optional)
        unknown = set(got) - set(names)
        if not unknown and not missing:
            bad = [f"{n}: {got[n]} != {names[n]}" for n in got if got[n] != names[n]]
            if not bad:
                return
            raise ValueError(f"{len(bad)} weight(s) with the wrong shape, e.g. {bad[:3]}")
        problems.append(f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                        f"{len(unknown)} unknown (e.g. {sorted(unknown)[:3]})")
    raise ValueError("weight names do not match the model's state_dict names: " + problems[0]
                     + (f"; nor its saved names: {problems[1]}" if len(problems) > 1 else ""))


def expected_weights(model_path: str) -> tuple[list[dict[str, tuple[int, ...]]], set[str]]:
    """The name -> shape sets an update may use, and the names it may leave out.

    First the transformers 5 state_dict of the model (built on the meta
    device: no memory, about a second), then the names saved in the folder's
    safetensors if they differ (Qwen2/2.5-VL, see the module docstring). With
    tied embeddings ``lm_head.weight`` is optional (vLLM skips it).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    sets = [{n: tuple(t.shape) for n, t in model.state_dict().items()}]
    saved = _saved_shapes(Path(model_path))
    if saved and saved != sets[0]:
        sets.append(saved)
    text = config.get_text_config()
    tied = getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings",
                                                                 False)
    return sets, ({"lm_head.weight"} if tied else set())


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the folder's safetensors files (headers only)."""
    from safetensors import safe_open

    if not folder.is_dir():
        return {}
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes
