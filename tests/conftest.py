"""Shared fixtures: one private Ray per test session, tiny models in a session cache.

Engines and trainer groups are expensive on 2 cores: tests that can share one
take it from a session fixture here instead of starting their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A fresh model cache for the session, seen by this process and by Ray workers."""
    path = tmp_path_factory.mktemp("coevolve-cache")
    os.environ["COEVOLVE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(tiny_cache):
    """The session's private Ray, bound to 127.0.0.1, shut down at the end.

    Four logical CPUs on a 2-core host, so a few single-CPU actors can coexist.
    """
    from pipelines.local_ray import ray_session

    env = {"env_vars": {"COEVOLVE_CACHE": str(tiny_cache), "PYTHONPATH": str(ROOT)}}
    with ray_session(num_cpus=4, runtime_env=env) as resources:
        yield resources


@pytest.fixture(scope="session")
def engines(ray_cluster):
    """One fp32 vLLM engine per tiny family, in Ray actors, shared by the session."""
    import ray

    from actors.generator import EngineSpec, GeneratorActor, cpu_engine_env

    created = {}

    def get(family: str):
        if family not in created:
            spec = EngineSpec(model=f"tiny://{family}", dtype="float32", max_model_len=2048,
                              max_num_batched_tokens=4096)
            actor_cls = ray.remote(num_cpus=1, runtime_env={"env_vars": cpu_engine_env(2)})(
                GeneratorActor)
            created[family] = actor_cls.options(name=f"test/{family}").remote(spec, family)
        return created[family]

    yield get
    for actor in created.values():
        ray.kill(actor)
