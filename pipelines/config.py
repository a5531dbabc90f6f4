"""Typed configuration: one dataclass per component, YAML + dotted overrides.

An experiment is a YAML file plus overrides such as ``trainer.lr=2e-6``.
Every field carries its documentation and its range in the schema (the
``param`` helper below), so defaults live here and nowhere else, and a wrong
value fails on load with a message that names the field and says what to do:

    >>> load_config("configs/mmzero/tiny-cpu.yaml", ["trainer.lr=-1"])
    ValueError: trainer.lr: must be > 0, got -1.0

A recipe brings its own settings: the top-level section named after it (``mmzero:``),
built from the recipe's settings dataclass (``pipelines/recipes``) and read as
``cfg.mmzero``; the core names no recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.config_build import (
    apply_override,
    build_section,
    merge_sections,
    plain,
    unknown_key_message,
)
from pipelines.config_yaml import (
    ConfigError,
    load_file,
    param,
    show,
)
from pipelines.layouts import ClusterSpec, PhaseLayout, PlacementConfig, RoleLayout
from pipelines.registry import BUILTIN_RECIPES, resolve_recipe
from pipelines.simulation import check_cluster

__all__ = [
    "ClusterSpec",
    "Config",
    "ConfigError",
    "PhaseLayout",
    "PlacementConfig",
    "RoleLayout",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "param",
]


# --------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = param("tiny", "Run name; the run directory is <root>/<name>.")
    root: str = param("runs", "Folder that holds run directories (shared storage on a cluster).")
    recipe: str = param(
        "simple", "Recipe to run: a built-in name (simple: your prompts and reward function; "
        "mmzero: Proposer -> SVG CodeGen -> Solver self-play) or package.module:Class for your "
        "own; a recipe's settings are the top-level section of its name (pipelines/recipes).")
    iterations: int = param(1, "Self-evolution iterations to run (resumable: raise it to continue).", ge=1)
    seed: int = param(0, "Seed of every RNG stream of the run (data order, sampling, init).", ge=0)
    save_every: int = param(10, "Checkpoint a training phase every K optimizer steps.", ge=1)
    keep_checkpoints: int = param(
        2, "Step checkpoints kept by the running phase (the newest K; one more exists for a "
           "moment while the next is saved). A finished phase keeps none: a resume skips it "
           "and the next phases and coevolve export read its hf/ export.", ge=1)
    keep_exports: int = param(
        0, "hf/ exports kept per role: the newest K finished phases' (an older one is deleted "
           "when a newer phase of its role is done; resume and coevolve export read only the "
           "newest). The role coevolve eval evaluates per iteration (the recipe's eval_role, "
           "e.g. MM-Zero's Solver) keeps all of its exports. 0 keeps every phase's.", ge=0)
    resume_changed: bool = param(
        False, "Continue a run directory although settings that decide what it computes "
               "changed (e.g. a recipe setting for the later iterations); without it such a "
               "resume is refused. The run's earlier config.yaml is kept as config.N.yaml.")
    sync_weights: bool = param(
        True, "Push trained weights to the engines after every step (off only for experiments "
        "that need a frozen sampler).")
    max_restarts: int = param(
        5, "Restarts one launch of the run may spend on failures before it stops, with the "
           "history of its failures in one message: a trainer group rebuilt from the last "
           "checkpoint after a rank died, hung or lost a peer, and an engine restarted after "
           "it died, broke or hung (generator.stall_timeout_s).", ge=0)
    overlap: int = param(
        0, "1: the engines sample (and the recipe scores) step k+1's batch with weights k while "
           "the trainer updates on batch k: one step off-policy, the ratio taken against the "
           "engines' log-probs (algorithm.behaviour_logprobs auto = engine), staleness logged "
           "per sample. For layouts where trainer and engines have devices of their own. "
           "docs/algorithms.md#overlap-runoverlap", ge=0, le=1)


@dataclass
class WarmStartConfig:
    data: str = param(
        "", "A short SFT of the base model before the first iteration, cached under "
        "$COEVOLVE_CACHE/warm: '' = none; recipe = the recipe's own examples (mmzero: the three "
        "formats on drawn figures, for tiny random models); or package.module:function "
        "(count, seed, cfg) -> list of pipelines.runtime.sft.SFTExample. docs/warm_start.md")
    examples: int = param(1600, "Examples asked of the data function.", ge=1)
    steps: int = param(200, "Optimizer steps of the warm start.", ge=1)
    batch_size: int = param(8, "Examples per optimizer step.", ge=1)
    lr: float = param(1.5e-3, "Peak AdamW learning rate of the warm start: linear warm-up "
                              "over 5% of the steps, then cosine decay to 0.", gt=0)
    save_every: int = param(100, "Checkpoint the warm start every K steps (a killed run "
                                 "resumes it from the newest).", ge=1)


@dataclass
class ModelConfig:
    path: str = param(
        "tiny://qwen2.5-vl",
        "Base model: a hub id, a local folder, or tiny://<family>[?hidden=..&layers=..] "
        "(families: qwen2-vl, qwen2.5-vl, qwen3-vl) for a tiny random model built offline.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = param(
        "auto", "Compute dtype of engines and trainer: auto = bfloat16 on GPU, float32 on CPU; "
        "bfloat16 = bf16 engines and FSDP2 bf16 mixed precision (fp32 master weights)."
    )
    max_pixels: int = param(
        0, "Largest image (in pixels) the processor keeps before downscaling; 0 = the model's "
        "own processor setting. Engines (vLLM mm_processor_kwargs) and the trainer's processor "
        "get the same value, so both count the same image tokens.", ge=0
    )
    warm_start: WarmStartConfig = param(
        WarmStartConfig(), "Built-in warm start: an SFT of the base model before iteration 1.")


@dataclass
class GeneratorConfig:
    max_model_len: int = param(4096, "Longest prompt + completion an engine accepts (tokens).", gt=0)
    max_num_batched_tokens: int = param(
        8192, "vLLM scheduler budget per step (also avoids split prefills on CPU).", gt=0
    )
    gpu_memory_utilization: float = param(
        0.6, "Share of each engine GPU that vLLM may take (weights + KV cache).", gt=0, le=1
    )
    cpu_kvcache_gib: int = param(1, "KV-cache size per engine on a CPU host (whole GiB).", ge=1)
    min_kv_sequences: int = param(
        8, "coevolve plan refuses a GPU engine whose KV cache holds fewer than this many "
           "max_model_len sequences (vLLM itself starts with one; the batch's other requests "
           "then wait or are preempted).", ge=1)
    enforce_eager: bool = param(
        True, "Run the model eagerly: no torch.compile (and on GPUs no CUDA graphs). Faster "
        "start, slower decode: false costs the ~50M benchmark model (benchmarks/vs_trl.py) "
        "~20 s of start-up per engine on CPU and saves ~15% of its generate time at 256 new "
        "tokens. vLLM compiles nothing with LoRA on CPU.")
    bucket_mb: int = param(
        1024, "Weight-push bucket size in MiB: what the trainer's rank 0 gathers, casts and "
              "broadcasts at once (two exist while one is on the wire); one object-store put "
              "each where pushes go through the object store.", gt=0)
    sync_timeout_s: float = param(
        300.0, "Longest wait for an engine to receive a weight push (its transfer group's "
               "timeout too); an engine past it is restarted and pushed to again. Keep it "
               "below trainer.collective_timeout_s: the trainer's other ranks wait for rank "
               "0 in the gathers meanwhile.", gt=0)
    sync_check_every: int = param(
        10, "Every this many weight pushes one engine (each in turn) greedily samples a "
            "fixed prompt with a drawn image and the trainer scores its tokens; a mean "
            "|engine - trainer| log-prob past sync_check_tol restarts that engine, and a "
            "second one fails the step naming it. 0 = never. Costs one 16-token request "
            "and one trainer forward.", ge=0)
    sync_check_tol: float = param(
        0.1, "Largest mean |engine - trainer| log-prob per token the sync probe accepts: "
             "~1e-6 in float32, a few 1e-2 in bfloat16.", gt=0)
    multiprocess: Literal["auto", "always", "never"] = param(
        "auto", "vLLM's engine core in its own process (always) or in the engine actor's "
        "(never: starts in seconds on CPU). auto: never on a CPU host with tensor_parallel 1, "
        "else always; tensor_parallel > 1 needs a process per rank.")
    stall_timeout_s: float = param(
        600.0, "An engine that makes no progress in a generate call (no engine step) or does "
               "not answer its pool's health probe for this long is hung: it is restarted, "
               "brought to the current weights, and its requests are sent again.", gt=0)
    call_timeout_s: float = param(
        600.0, "Longest wait for an engine's other calls (weight push, adapter load, sleep, "
               "wake-up, health); an engine past it is restarted and re-synced.", gt=0)
    start_timeout_s: float = param(
        1800.0, "Longest wait for an engine to start and load its model; past it the run "
                "stops with the engine named.", gt=0)
    temperature: float = param(1.0, "Default sampling temperature.", ge=0)
    top_p: float = param(0.99, "Default nucleus sampling threshold.", gt=0, le=1)


@dataclass
class LoraConfig:
    enabled: bool = param(False, "Train LoRA adapters instead of full weights.")
    rank: int = param(16, "LoRA rank r (at most 512, vLLM's largest).", gt=0, le=512)
    alpha: int = param(32, "LoRA alpha (scale = alpha / r).", gt=0)
    dropout: float = param(0.05, "LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = param(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that receive adapters.",
    )


@dataclass
class TrainerConfig:
    lr: float = param(1e-6, "AdamW learning rate.", gt=0)
    weight_decay: float = param(1e-2, "AdamW weight decay.", ge=0)
    betas: list[float] = param([0.9, 0.999], "AdamW betas (beta1, beta2).")
    grad_clip: float = param(1.0, "Clip the global gradient norm to this value (0 = off).", ge=0)
    schedule: Literal["constant", "warmup", "cosine"] = param(
        "constant", "Learning-rate schedule: constant, linear warm-up then constant, or cosine."
    )
    warmup_ratio: float = param(0.0, "Share of steps spent warming up (warmup and cosine).", ge=0, le=1)
    micro_batch_tokens: int = param(
        16384, "Token budget of one micro-batch (prompt + completion, per rank).", gt=0
    )
    gradient_checkpointing: bool = param(True, "Recompute activations in the backward pass.")
    freeze_vision: bool = param(False, "Freeze the vision tower.")
    freeze_projector: bool = param(False, "Freeze the vision-language projector (merger).")
    lora: LoraConfig = param(LoraConfig(), "LoRA settings.")
    logprob_chunk_tokens: int = param(
        2048, "Score tokens from the final hidden states and the LM head in chunks of this many "
              "tokens, recomputed in the backward, instead of materialising [tokens, vocabulary] "
              "logits (0 = full logits; the 'full' KL estimator needs 0).", ge=0)
    share_prompts: bool = param(
        True, "Score the samples of one prompt in one packed row: the prompt and its images "
        "run once per group instead of once per sample, each completion attending to the "
        "prompt and to itself (same log-probs to fp32 rounding). Needs logprob_chunk_tokens "
        "> 0; a micro-batch without shared prompts runs flat.")
    reference_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "Storage dtype of the frozen KL reference; bfloat16 halves it and, under bf16 "
                   "mixed precision (GPU), gives the same log-probs.")
    call_timeout_s: float = param(
        3600.0, "Longest wait for one trainer call on all ranks (a forward-backward of a step's "
                "batch, a checkpoint save); past it the group counts as failed and is rebuilt "
                "from the last checkpoint (run.max_restarts).", gt=0)
    collective_timeout_s: float = param(
        600.0, "torch.distributed timeout of one collective: a rank whose peer died or hung "
               "fails after this long, and the group is rebuilt.", gt=0)
    offload: bool = param(
        False, "FSDP2 CPU offload: parameter, gradient and AdamW shards in host memory, "
               "optimizer step on the CPU (saves 16 bytes per parameter / ranks of GPU memory).")


@dataclass
class AlgorithmConfig:
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce", "reinforce_pp"] = param(
        "grpo", "Advantage estimator: grpo (r - mean) / std, drgrpo r - mean, rloo r - mean of "
        "the others (each over a prompt's samples); reinforce r - EMA baseline; reinforce_pp "
        "token-level returns whitened over the batch (pipelines/algorithms/estimators.py)."
    )
    baseline_decay: float = param(
        0.9, "reinforce: EMA baseline decay, b <- decay * b + (1 - decay) * r.", ge=0, lt=1)
    gamma: float = param(1.0, "reinforce_pp: discount of the token-level returns.", ge=0, le=1)
    whiten_size: int = param(
        0, "reinforce_pp: whiten the returns over each run of this many consecutive "
        "responses instead of the whole batch (0); MAYE whitens each rank's 128.", ge=0)
    kl_in_reward: float = param(
        0.0, "reinforce_pp: coefficient of the per-token -k3 KL reward (MAYE: 0).", ge=0)
    mini_batches: int = param(
        1, "PPO updates per epoch over one generation batch (optimizer steps; 1 = one update "
        "per generation step, on-policy).", ge=1)
    epochs: int = param(1, "Passes over each generation batch.", ge=1)
    loss: Literal["ppo", "reinforce"] = param("ppo", "Policy objective.")
    clip_low: float = param(0.2, "PPO ratio clip below 1 (1 - clip_low).", ge=0, lt=1)
    clip_high: float = param(0.3, "PPO ratio clip above 1 (1 + clip_high); > clip_low = clip-higher.", ge=0)
    dual_clip: float = param(3.0, "Dual-clip constant for negative advantages (0 = off).", ge=0)
    kl_coef: float = param(1e-2, "Coefficient of the KL loss against the reference policy "
                           "(the starting beta when kl_control is adaptive).", ge=0)
    kl_control: Literal["fixed", "adaptive"] = param(
        "fixed", "KL coefficient: fixed at kl_coef, or adaptive: after each optimizer step "
        "beta <- clip(beta * exp(kl_rate * (KL - kl_target) / kl_target), 1e-8, 100).")
    kl_target: float = param(0.02, "adaptive KL: the KL the coefficient steers towards.", gt=0)
    kl_rate: float = param(0.1, "adaptive KL: proportional gain.", gt=0)
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl", "full"] = param(
        "low_var_kl", "KL estimator (low_var_kl = k3 clamped to [-10, 10])."
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "micro-token-mean"] = param(
        "token-mean", "How per-token losses are reduced over the batch (docs/algorithms.md): "
        "micro-token-mean is a token mean per run of loss_agg_seqs sequences, averaged over "
        "the runs (MAYE's micro-batches of 2).")
    loss_agg_seqs: int = param(2, "micro-token-mean: sequences per token mean.", ge=1)
    entropy_coef: float = param(0.0, "Entropy bonus coefficient.", ge=0)
    behaviour_logprobs: Literal["auto", "trainer", "engine"] = param(
        "auto", "Where the PPO ratio's behaviour log-probs come from: trainer (a forward "
        "pass before the updates), engine (the sampling engines' own, no pass; they match "
        "the trainer to ~1e-6 in fp32, not in bf16) or auto (none when a generation batch "
        "gets one update without dropout: that update's own forward is the behaviour "
        "policy; else trainer; with run.overlap: engine, the weights that sampled). trainer "
        "with run.overlap: the ratio is against the weights before the update (decoupled "
        "PPO), with tis_cap correcting for the engines' older weights.")
    tis_cap: float = param(
        0.0, "Truncated importance sampling against the engines that sampled: each token's "
        "policy term is weighted by min(p_behaviour / p_engine, tis_cap); 0 = off.", ge=0)
    log_entropy: bool = param(
        False, "Log the policy's entropy (policy/entropy) even without an entropy bonus "
        "(one softmax over the vocabulary per token).")
    reward_budget_s: float = param(
        60.0, "Seconds of symbolic answer checks (math-verify, in the grading worker, worker "
        "starts included) one step's scoring may spend in all (judge sampling and rendering "
        "are not charged); checks past it count as wrong and in reward/timeouts.",
        gt=0)

    def check(self) -> None:
        if self.dual_clip and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip: must be 0 (off) or > 1, got {self.dual_clip}")
        if self.kl_control == "adaptive" and self.kl_coef <= 0:
            raise ConfigError("kl_control: adaptive needs a starting kl_coef > 0 (EvoLMM: 1e-3)")


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = param(
        "offline", "wandb mode: offline (default, syncable later), online, or disabled."
    )
    project: str = param("coevolve", "wandb project.")
    progress: bool = param(True, "Show progress bars in the job log.")


@dataclass
class Config:
    run: RunConfig = param(RunConfig(), "Run identity, iterations, seed, checkpoint cadence.")
    model: ModelConfig = param(ModelConfig(), "The base model.")
    generator: GeneratorConfig = param(GeneratorConfig(), "vLLM engine settings.")
    trainer: TrainerConfig = param(TrainerConfig(), "FSDP trainer and optimizer settings.")
    algorithm: AlgorithmConfig = param(AlgorithmConfig(), "Policy-gradient objective.")
    placement: PlacementConfig = param(PlacementConfig(), "Devices per role.")
    logging: LoggingConfig = param(LoggingConfig(), "Metrics sinks and progress.")
    # The recipe's own settings, under the top-level key ``recipe_section`` (e.g. mmzero:
    # ...), read as ``cfg.<section>``; both filled by the loader from run.recipe.
    recipe_section: str | None = field(default=None, metadata={"recipe": True})
    recipe_settings: Any = field(default=None, metadata={"recipe": True})

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: the recipe's section by its name
        state = self.__dict__
        if name == state.get("recipe_section"):
            return state["recipe_settings"]
        if name.startswith("__") or "run" not in state:
            raise AttributeError(name)
        raise AttributeError(f"config has no section {name!r} (run.recipe is "
                             f"{state['run'].recipe!r}, whose section is "
                             f"{state.get('recipe_section')!r})")

    def check(self) -> None:
        check_cluster(self.placement)
        a = self.algorithm
        if self.run.overlap:
            if self.placement.cpu_threads == "all":
                raise ConfigError("run.overlap: 1 generates while the trainer updates, but "
                                  "placement.cpu_threads: all gives each of them every core for "
                                  "its turn; set placement.cpu_threads=reserved")
            colocated = set(self.placement.colocate).union(
                *(p.colocate or () for p in self.placement.phases.values()))
            if colocated:
                raise ConfigError(f"run.overlap: the engines of {', '.join(sorted(colocated))} "
                                  "share the trainer's devices and sleep during its updates; "
                                  "overlap needs engines on devices of their own")
        if self.trainer.logprob_chunk_tokens and a.kl_estimator == "full" and a.kl_coef > 0:
            raise ConfigError("trainer.logprob_chunk_tokens: kl_estimator 'full' needs the "
                              "whole-vocabulary logits; set trainer.logprob_chunk_tokens=0")
        if self.generator.multiprocess == "never":
            layouts = [self.placement.roles] + [p.roles for p in self.placement.phases.values()
                                                if p.roles]
            for roles in layouts:
                for name, role in roles.items():
                    if role.tensor_parallel > 1:
                        raise ConfigError(
                            f"generator.multiprocess: never cannot run {name}'s tensor_parallel "
                            f"{role.tensor_parallel} engines (one worker process per rank); "
                            "use auto or always")


# --------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply ``a.b=value`` overrides, validate.

    Every problem with the file, the overrides or the values is a one-line ConfigError.
    """
    data: dict = _load_layered(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data)


def _load_layered(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file; ``base: other.yaml`` (relative to the file) is read first and this
    file's values are merged over it, section by section (a variant of a preset states
    only what it changes)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base files form a cycle: "
                          f"{' -> '.join(str(p) for p in (*seen, path))}")
    data = load_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another config file, "
                          f"got {show(base)}")
    return merge_sections(_load_layered(path.parent / base, (*seen, path)), data)


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {show(data)}")
    run = data.get("run")
    name = run.get("recipe", RunConfig.recipe) if isinstance(run, dict) else RunConfig.recipe
    if not isinstance(name, str):
        raise ConfigError(f"run.recipe: expected a string, got {show(name)}")
    try:
        ref = resolve_recipe(name)
    except ValueError as err:
        raise ConfigError(f"run.recipe: {err}") from None
    data = dict(data)
    section = data.pop(ref.section, None) if ref.section else None
    for other in BUILTIN_RECIPES:
        if other in data and other != ref.section:
            raise ConfigError(f"{other}: settings of the {other} recipe, but run.recipe is "
                              f"{name!r}; set run.recipe={other} or remove the section")
    for key in ("recipe_section", "recipe_settings"):
        if key in data:
            raise ConfigError(unknown_key_message("", key, [f.name for f in fields(Config)
                                                             if "recipe" not in f.metadata]))
    cfg = build_section(Config, data, "")
    cfg.recipe_section = ref.section
    if ref.settings is not None:
        cfg.recipe_settings = build_section(ref.settings, {} if section is None else section,
                                     ref.section)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """The config (or any part of it) as plain data; the recipe's settings under their
    section."""
    if isinstance(cfg, Config):
        out = {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)
               if "recipe" not in f.metadata}
        if cfg.recipe_section and cfg.recipe_settings is not None:
            out[cfg.recipe_section] = plain(cfg.recipe_settings)
        return out
    return plain(cfg)


def dump_config(cfg: Config, with_docs: bool = False) -> str:
    """The resolved config as YAML; ``with_docs`` adds each field's doc as a comment."""
    if not with_docs:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    lines: list[str] = []
    _dump_documented(cfg, 0, lines)
    if cfg.recipe_section and cfg.recipe_settings is not None:
        doc = (type(cfg.recipe_settings).__doc__ or "").strip().splitlines()
        lines.append(f"# {doc[0] if doc else 'The recipe settings.'}")
        lines.append(f"{cfg.recipe_section}:")
        _dump_documented(cfg.recipe_settings, 1, lines)
    return "\n".join(lines) + "\n"


def _dump_documented(obj: Any, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for f in fields(obj):
        if "recipe" in f.metadata:
            continue
        value = getattr(obj, f.name)
        out.append(f"{pad}# {f.metadata.get('doc', '')}")
        if is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            _dump_documented(value, indent + 1, out)
        elif isinstance(value, dict) and value and all(is_dataclass(v) for v in value.values()):
            out.append(f"{pad}{f.name}:")
            for key, sub in value.items():
                out.append(f"{pad}  {key}:")
                _dump_documented(sub, indent + 2, out)
        else:
            text = yaml.safe_dump({f.name: config_to_dict(value)}, sort_keys=False).rstrip()
            out.extend(pad + line for line in text.splitlines())
