"""lmms-eval model plugin: ``lmms_eval --model coevolve --model_args pretrained=PATH ...``.

lmms-eval finds it through the ``lmms_eval.models`` entry point (pyproject.toml),
so its own task definitions, prompts, metrics and results files evaluate a
coevolve checkpoint: an ``hf/`` folder, a peft adapter on its base
(``adapter=FOLDER``), a hub id or ``tiny://...``. Generation runs on the same
generator pool as training and ``coevolve eval`` (vLLM engines in Ray actors,
data parallel over ``engines``), attached to ``RAY_ADDRESS`` when set, else on a
private Ray bound to 127.0.0.1 that lives as long as the model object.

Model arguments (``--model_args k=v,...``): ``pretrained`` (required),
``adapter``, ``engines`` (default 1), ``dtype`` (default auto),
``max_model_len`` (default 4096), ``max_pixels`` (default: the model's),
``seed`` (default 0; every request's seed derives from it, the task and the
document id, so results do not depend on batching or the engine count).
``device`` and ``max_batch_size``, which lmms-eval's command line passes to every
model, are accepted and ignored (the pool places its engines itself).
Only generation is served: log-likelihood tasks raise NotImplementedError.

Stop strings: a task without ``until`` gets lmms-eval's default ``["\n\n"]``
(its few-shot delimiter), which would end a chain-of-thought answer at its first
blank line; like lmms-eval's own Qwen-VL models this plugin drops that one stop
string and keeps any other the task sets.
"""

from __future__ import annotations

import atexit
import contextlib
from pathlib import Path

from lmms_eval.api.model import lmms

from actors.sampling import Request, Sampling
from pipelines.config import load_config
from pipelines.eval.engines import read_adapter, start_pool
from pipelines.eval.tasks import item_seed
from pipelines.runtime.local_ray import ray_session

MODEL_ID = "coevolve"
BLANK_LINE = "\n\n"  # lmms-eval's default stop string (its few-shot delimiter)


def manifest():
    """The entry point's payload: how lmms-eval registers this model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.CoevolveLMM")


class CoevolveLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, adapter: str | None = None, engines: int = 1,
                 dtype: str = "auto", max_model_len: int = 4096, max_pixels: int = 0,
                 seed: int = 0, batch_size: int | str = 64, **kwargs) -> None:
        super().__init__()

        kwargs.pop("device", None)  # lmms-eval passes these to every model
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ValueError(f"coevolve model: unknown model_args {sorted(kwargs)}; see "
                             "pipelines/eval/lmms_model.py")
        engines = int(engines)
        self.seed = int(seed)
        self.batch_size_per_gpu = int(batch_size)
        cfg = load_config(None, [f"model.dtype={dtype}", f"generator.max_model_len={max_model_len}",
                                 f"model.max_pixels={int(max_pixels)}", f"run.seed={self.seed}",
                                 "run.name=lmms-eval"])
        self._session = contextlib.ExitStack()
        self._session.enter_context(ray_session(num_cpus=max(2, engines + 1)))
        path = Path(pretrained)
        model = str(path.resolve()) if path.is_dir() else pretrained
        self.pool = start_pool(cfg, "lmms-eval", model, engines=engines, lora=adapter is not None)
        # Before Ray's own exit hook (atexit runs last-registered first): a pool shut down
        # after Ray would make Ray start a new cluster just to kill the engines.
        atexit.register(self.close)
        self.adapter = None
        if adapter:
            self.pool.load_adapter("eval", read_adapter(adapter), version=0)
            self.adapter = "eval"

    @classmethod
    def on_pool(cls, pool, adapter: str | None = None, seed: int = 0,
                batch_size: int = 64) -> CoevolveLMM:
        """The model on a pool someone else owns (``coevolve eval --tasks lmms:<task>``):
        closing it leaves the pool running."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self.pool, self.adapter, self.seed = pool, adapter, seed
        self.batch_size_per_gpu = batch_size
        self._session, self._owns_pool = None, False
        return self

    def close(self) -> None:
        import ray

        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None and getattr(self, "_owns_pool", True) and ray.is_initialized():
            pool.shutdown()
        if getattr(self, "_session", None) is not None:
            self._session.close()
            self._session = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- lmms-eval's interface -------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        out: list[str] = []
        bar = tqdm(total=len(requests), desc="coevolve generating", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = requests[start:start + self.batch_size_per_gpu]
            completions = self.pool.generate([self._request(r) for r in batch])
            out += [samples[0].text for samples in completions]
            bar.update(len(batch))
        bar.close()
        return out

    def _request(self, instance) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        if visuals and isinstance(visuals[0], list):
            visuals = visuals[0]
        images = [v for v in (visuals or []) if v is not None]
        gen = dict(gen_kwargs or {})
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        until = [u for u in until if u != BLANK_LINE]  # lmms-eval's default: see above
        greedy = not gen.get("do_sample", False) or float(gen.get("temperature", 0) or 0) == 0
        sampling = Sampling(n=1, temperature=0.0 if greedy else float(gen["temperature"]),
                            top_p=float(gen.get("top_p") or 1.0),
                            max_tokens=int(gen.get("max_new_tokens", 256)), stop=until,
                            seed=item_seed(self.seed, task, split, doc_id))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
        return Request([{"role": "user", "content": content}], images=images, sampling=sampling,
                       adapter=self.adapter)

    def loglikelihood(self, requests):
        raise NotImplementedError("the coevolve model serves generation tasks only "
                                  "(output_type: generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the coevolve model serves single-round generation tasks only")
