"""Shared fixtures: one private Ray per test session, tiny models in a session cache.

Engines and trainer groups are expensive on 2 cores: tests that can share one
take it from a session fixture here instead of starting their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    """A fresh model cache for the session, seen by this process and by Ray workers.

    Not under pytest's basetemp: a concurrent pytest session on the same host
    prunes old basetemps, and Ray workers would lose the models mid-run.
    """
    path = Path(tempfile.mkdtemp(prefix="coevolve-test-cache-"))
    os.environ["COEVOLVE_CACHE"] = str(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(tiny_cache):
    """The session's private Ray, bound to 127.0.0.1, shut down at the end.

    Sixteen logical CPUs on a 2-core host, so that the session's engines and
    trainer ranks (one logical CPU each) can coexist; Ray only counts them.
    """
    from pipelines.runtime.local_ray import ray_session

    env = {"env_vars": {"COEVOLVE_CACHE": str(tiny_cache), "PYTHONPATH": str(ROOT)}}
    with ray_session(num_cpus=16, runtime_env=env) as resources:
        yield resources


@pytest.fixture(scope="module")
def engines(ray_cluster, request):
    """One fp32 vLLM engine per tiny family, in Ray actors, shared by a module's tests.

    Per module, not per session: with two test processes (pyproject's ``-n 2``) engines
    kept for the session would hold a few GiB in each of them on a 24 GiB host."""
    import ray

    from actors.generator import EngineSpec, GeneratorActor, cpu_engine_env

    created = {}
    module = request.module.__name__

    def get(family: str):
        if family not in created:
            spec = EngineSpec(model=f"tiny://{family}", dtype="float32", max_model_len=2048,
                              max_num_batched_tokens=4096)
            actor_cls = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(2)})(
                GeneratorActor)
            created[family] = actor_cls.options(name=f"test/{module}/{family}").remote(
                spec, family)
        return created[family]

    yield get
    for actor in created.values():
        ray.kill(actor)


# Modules whose engines and trainer ranks take the most memory (multiprocess and
# tensor-parallel engines, several real-vocabulary engines at once): never two of them
# at once on a 24 GiB host, so with two test processes they form one scheduling unit,
# run one after another by one process while the other takes every other module.
# In this order: test_mmzero (three real-vocabulary engines and a trainer) first, while
# the other process runs the small modules.
MEMORY_HEAVY = ("test_mmzero", "test_engine_shapes", "test_driver", "test_generator")
# Modules that never run beside each other (a file lock, below): test_trainer's end
# (three trainer groups and a real-vocabulary engine) beside test_mmzero ran the host
# out of memory once (22.6 of 23.5 GiB). Uncontended in the usual order.
TAKE_TURNS = {"test_mmzero", "test_trainer"}


def module_of(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def heavy(nodeid: str) -> bool:
    return module_of(nodeid) in MEMORY_HEAVY


def pytest_collection_modifyitems(config, items):
    """The MEMORY_HEAVY modules first, in their order, so that the longest unit starts
    at once (collection order kept otherwise; pyproject: ``--no-loadscope-reorder``)."""
    def rank(item) -> int:
        module = module_of(item.nodeid)
        return MEMORY_HEAVY.index(module) if module in MEMORY_HEAVY else len(MEMORY_HEAVY)

    items.sort(key=rank)


@pytest.fixture(scope="module", autouse=True)
def take_turns(request):
    """A lock shared by the test processes of one pytest run (pytest-xdist workers are
    children of one controller) around each module in TAKE_TURNS."""
    import fcntl

    if request.module.__name__ not in TAKE_TURNS:
        yield
        return
    controller = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
    path = Path(tempfile.gettempdir()) / f"coevolve-tests-{controller}.memory.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadscope scheduling with units of one module each (its fixtures
    start engines once), except the MEMORY_HEAVY modules: one unit. (xdist's loadgroup
    would do it with markers, but it renames items by a field pytest 9.2 no longer
    reads, and splits the other modules test by test.)"""
    from xdist.scheduler import LoadScopeScheduling

    class HeavyModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "memory-heavy" if heavy(nodeid) else nodeid.split("::", 1)[0]

    return HeavyModulesTogether(config, log)


def chart_png(seed: int = 0, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small bar chart drawn locally; seed varies colours and bar heights."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i in range(3):
        height = 10 + (seed * 17 + i * 23) % (size[1] - 20)
        x = 8 + i * (size[0] - 16) // 3
        draw.rectangle([x, size[1] - 6 - height, x + 18, size[1] - 6], fill=(60 * i, 40 * seed % 255, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_train_batch(path: str, n_prompts: int = 3, n: int = 2, seed: int = 0, images: bool = True):
    """A deterministic TrainBatch: image (or text) prompts through the real processor,
    random completions of 3-8 tokens, one advantage per sample."""
    import io

    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from actors.batching import TrainBatch

    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(seed)
    ids, prompt_lens, prompt_index, all_images, adv = [], [], [], [], []
    for p in range(n_prompts):
        content = [{"type": "text", "text": f"Question {seed}-{p}: how many bars?"}]
        if images:
            content.insert(0, {"type": "image"})
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
        png = chart_png(seed * 7 + p, (64 + 16 * p, 56))
        kwargs = {"images": [Image.open(io.BytesIO(png))]} if images else {}
        prompt = processor(text=[text], return_tensors="np", **kwargs)["input_ids"][0]
        all_images.append([png] if images else [])
        for _ in range(n):
            completion = rng.integers(20, 500, size=int(rng.integers(3, 9)))
            ids.append(np.concatenate([prompt, completion]).astype(np.int64))
            prompt_lens.append(len(prompt))
            prompt_index.append(p)
            adv.append(float(rng.normal()))
    return TrainBatch(ids, np.array(prompt_lens), np.array(prompt_index), all_images,
                      np.array(adv, dtype=np.float32))


def start_scenario(script: str, *args: str):
    """Run ``python SCRIPT ARGS...`` (a test file's own scenario mode) in a process
    group of its own, without RAY_ADDRESS: it starts whatever Ray it needs."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def scenario_result(name: str, proc, timeout: float) -> dict:
    """The JSON a scenario printed last; on a timeout its own process group is killed."""
    import json
    import signal
    import subprocess

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario's own process group only
        out, err = proc.communicate()
        pytest.fail(f"scenario {name} timed out\n{err[-3000:]}")
    assert proc.returncode == 0, f"scenario {name} failed\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def sigkill_after_step(proc, metrics_path, key: str, step: int = 3, timeout: float = 600) -> None:
    """SIGKILL ``proc`` (a driver process) once ``metrics_path`` logged ``key`` for ``step``
    (a checkpoint of step 2 is then on disk with save_every 2); fail if it exits first."""
    import signal
    import time

    from pipelines.runtime.metrics import read_metrics

    deadline = time.monotonic() + timeout
    while not any(m["step"] >= step for m in read_metrics(metrics_path) if key in m):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} in {metrics_path} after {timeout} s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def driver_cli(*args: str):
    """``python -m pipelines.cli run ARGS`` in a process of its own, on the session's Ray
    (RAY_ADDRESS) with tests/ importable (test recipes and rewards); stderr piped."""
    import subprocess
    import sys

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
