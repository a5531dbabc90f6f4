"""Weight sync in every engine shape GPU runs use: multiprocess and tensor parallel.

The rest of the suite runs in-process engines (a CPU host's fast start); the
sync code is the same (``actors/vllm_worker.py`` runs in every worker), and
this module covers the shapes where it runs in other processes: a
multiprocess engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, one worker
process) and a tensor-parallel 2 engine (two worker processes, the ``mp``
executor, one core each). The weights come from a real trainer group after an
optimizer step; the references are fresh engines loaded from the trainer's
``hf/`` export.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from actors.generator import EngineSpec, Request, Sampling

pytestmark = pytest.mark.slow

# The small vocabulary: these tests are about the shapes and the sync path, and each
# moves the weights several times (tests/test_generator.py runs the real vocabulary).
MODEL = "tiny://qwen2.5-vl"


def spec(model: str = MODEL, **changes) -> EngineSpec:
    return EngineSpec(model=model, dtype="float32", max_model_len=1024,
                      max_num_batched_tokens=2048, **changes)


def requests() -> list[Request]:
    from conftest import chart_png

    greedy = Sampling(temperature=0.0, max_tokens=12)
    return [Request([{"role": "user", "content": "Describe a bar chart in one line."}],
                    sampling=greedy),
            Request([{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": "Read the chart."}]}],
                    images=[chart_png(3)], sampling=greedy)]


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """(bucket refs, manifest, hf/ export, the group) of a 1-rank trainer after one
    optimizer step."""
    import ray
    from conftest import make_train_batch

    from actors.models import resolve_model
    from actors.objectives import ObjectiveSpec
    from actors.trainer import TrainerSpec
    from actors.trainer_group import TrainerGroup
    from actors.weights import WeightVersion

    group = TrainerGroup(TrainerSpec(model=MODEL, objective=ObjectiveSpec(kl_coef=0.0), lr=1e-2,
                                     reference=False,
                                     micro_batch_tokens=4096, threads=1),
                         1, name="test/shapes-trainer",
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        batch = make_train_batch(resolve_model(MODEL), n_prompts=2, n=2, seed=5)
        batch = batch.with_column(old_logprobs=group.compute_logprobs(batch))
        group.forward_backward(batch)
        group.optim_step()
        refs = group.weight_buckets(1 << 20)
        manifest = WeightVersion.of(ray.get(refs), version=1)
        export = tmp_path_factory.mktemp("shapes") / "hf"
        group.export_hf(str(export))
        yield refs, manifest, str(export), group
    finally:
        group.shutdown()


def start(name: str, engine_spec: EngineSpec, threads: int = 1, wait: bool = True):
    from actors.pool import GeneratorPool

    return GeneratorPool(name, engine_spec, n_engines=1, resources={"num_cpus": threads},
                         threads=threads, run="test-shapes", wait=wait)


def idle_cpu_seconds(pool, seconds: float) -> dict[str, float]:
    """CPU seconds an idle engine's processes (its actor's and vLLM's under it) burn in
    ``seconds`` of wall time, by process."""
    import psutil
    import ray

    root = psutil.Process(ray.get(pool.actors[0].health.remote())["pid"])
    tree = [root, *root.children(recursive=True)]

    def used() -> dict[str, float]:
        out = {}
        for p in tree:
            try:
                t = p.cpu_times()
                out[f"{p.name()} {p.pid}"] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    before = used()
    time.sleep(seconds)
    after = used()
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}


def first(pool) -> list:
    return [samples[0] for samples in pool.generate(requests())]


@pytest.fixture(scope="module")
def mp(trained):
    """One multiprocess engine for the module (an MP start is the slowest on 2 cores):
    every test syncs it to a new version of the trained weights before it looks, and a
    test that breaks it leaves it restarted by the pool."""
    pool = start("mp", spec(multiprocess=True))
    yield pool
    pool.shutdown()


def sync(pool, trained) -> int:
    """The trained weights as the pool's next version; that version."""
    refs, manifest, *_ = trained
    version = pool.version + 1
    pool.update_weights(refs, version=version, manifest=manifest)
    return version


def test_multiprocess_and_tensor_parallel_engines_load_the_trainers_weights(trained, mp):
    """After a sync, an MP engine equals a fresh MP engine on the export (tokens and
    log-probs); a TP=2 engine gives the same greedy tokens as TP=1."""
    import ray

    refs, manifest, export, _ = trained
    tp = start("tp", spec(tensor_parallel=2), threads=2)
    try:
        assert ray.get(mp.actors[0].health.remote())["pid"]
        before = [c.token_ids for c in first(tp)]  # the starting weights
        [m] = mp.update_weights(refs, version=(version := mp.version + 1), manifest=manifest)
        [t] = tp.update_weights(refs, version=1, manifest=manifest)
        assert m["workers"] == 1 and t["workers"] == 2  # each TP rank loaded its shard
        synced_mp, synced_tp = first(mp), first(tp)
        # cpu_threads: all gives an engine every core in its turn; between turns no
        # process of it may spin (vLLM polls its worker queue for 1 s after a call, then
        # sleeps). A spinning thread burns 2 CPU-seconds in 2 s; measured per process:
        # 0.00-0.02, and 0.35-0.44 for a worker process, whose Ray connection (it fetches
        # the weights) wakes now and then in this busy session (0.05 in a quiet one)
        time.sleep(1.5)
        for pool in (mp, tp):
            used = idle_cpu_seconds(pool, 2.0)
            print(f"{pool.role} engine idle for 2 s: {used} CPU-seconds")
            assert max(used.values()) < 0.7, f"{pool.role} engine idle for 2 s used {used}"
    finally:
        tp.shutdown()
    assert [c.token_ids for c in synced_mp] != before  # the step moved the weights enough
    fresh = start("fresh", spec(export, multiprocess=True))
    try:
        reference = first(fresh)
    finally:
        fresh.shutdown()
    for got, want in zip(synced_mp, reference):
        assert got.token_ids == want.token_ids
        # same kernels on the same weights in the same process layout
        assert np.array_equal(got.logprobs, want.logprobs)
        assert got.version == version
    assert [c.token_ids for c in synced_tp] == [c.token_ids for c in reference]


def test_a_push_over_the_transfer_protocol_equals_the_object_store_sync_in_every_shape(
        trained, mp):
    """``push_from``: the trainer's rank 0 broadcasts buckets to the workers of an
    in-process, a multiprocess and a tensor-parallel-2 engine over gloo (vLLM's
    weight-transfer protocol, the coevolve engine); each then samples exactly what the
    object-store sync of the same weights gives it (tokens and log-probs), and its
    log-probs of the sync probe equal the trainer's."""
    from actors.weight_push import check

    refs, manifest, _, group = trained
    inproc = start("inproc", spec())
    tp = start("tp-push", spec(tensor_parallel=2), threads=2)
    try:
        for pool in (inproc, mp, tp):
            [got] = pool.push_from(group, (version := pool.version + 1), bucket_bytes=1 << 20)
            assert got["version"] == version and got["bytes"] == manifest.total_bytes
            assert check(pool, group, 0, tol=1e-5) < 1e-5, pool.role  # fp32: ~1e-7
            pushed = first(pool)
            pool.update_weights(refs, version=version + 1, manifest=manifest)
            synced = first(pool)
            for a, b in zip(pushed, synced):
                assert a.token_ids == b.token_ids, pool.role
                assert np.array_equal(a.logprobs, b.logprobs), pool.role
                assert (a.version, b.version) == (version, version + 1)
        # a second push reuses the groups (no new rendezvous)
        assert inproc.push_from(group, inproc.version + 1, bucket_bytes=1 << 20)[0]["seconds"]
    finally:
        inproc.shutdown()
        tp.shutdown()


def test_a_push_whose_plan_differs_from_the_model_is_refused_before_anything_loads(
        trained, mp):
    """A plan with a tensor the model lacks, or one of the wrong shape, is refused by the
    engine before it joins the broadcast: nothing loads, the engine keeps serving."""
    import dataclasses

    import ray

    *_, group = trained
    version = sync(mp, trained)
    before = [c.token_ids for c in first(mp)]
    good = dataclasses.asdict(group.transfer_plan(1 << 20, "float32"))
    renamed = {**good, "names": ["model.not_a_layer.weight", *good["names"][1:]]}
    reshaped = {**good, "shapes": [[1, 1], *good["shapes"][1:]]}
    for bad in (renamed, reshaped):
        with pytest.raises(ValueError):
            ray.get(mp.actors[0].receive_weights.remote(bad, version + 1))
    health = mp.health()[0]
    assert not health["broken"] and health["version"] == version
    assert [c.token_ids for c in first(mp)] == before


def test_failed_sync_breaks_a_multiprocess_engine_and_the_pool_restarts_it(trained, mp):
    """A reload that fails half-way in the worker process marks the engine broken; the
    pool restarts it at the version it serves."""
    import ray

    from actors.generator import EngineBroken
    from actors.weights import put_buckets

    refs, manifest, *_ = trained
    version = sync(mp, trained)
    synced = [c.token_ids for c in first(mp)]
    restarts = mp.restarts
    # reversed buckets: the names check out against the manifest up front, then the
    # worker finds the order wrong half-way through the reload
    reversed_refs = put_buckets(list(reversed(ray.get(refs))))
    with pytest.raises(EngineBroken):
        ray.get(mp.actors[0].update_weights.remote(reversed_refs, version + 1, manifest))
    assert "failed" in mp.health()[0]["broken"]
    assert [c.token_ids for c in first(mp)] == synced
    assert mp.restarts == restarts + 1 and mp.health()[0]["version"] == version


def test_a_dead_engine_core_is_restarted_like_a_dead_actor(trained, mp):
    """The engine core process of a multiprocess engine (the shape GPU runs use) dies:
    vLLM's client raises EngineDeadError, the actor reports itself broken, and the pool
    restarts it at the version it served and resends the requests."""
    import psutil
    import ray

    version = sync(mp, trained)
    before = [c.token_ids for c in first(mp)]
    restarts = mp.restarts
    actor_pid = ray.get(mp.actors[0].health.remote())["pid"]
    cores = [p for p in psutil.Process(actor_pid).children(recursive=True)
             if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert cores, [p.name() for p in psutil.Process(actor_pid).children(recursive=True)]
    for p in cores:  # this test's own engine's core
        p.kill()
    psutil.wait_procs(cores, timeout=30)
    after = [c.token_ids for c in first(mp)]
    assert after == before
    assert mp.restarts == restarts + 1
    health = mp.health()[0]
    assert health["version"] == version and health["pid"] != actor_pid and not health["broken"]


def object_store_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def test_object_store_stays_flat_over_twenty_syncs_into_worker_processes(trained, mp):
    """Buckets fetched by vLLM's worker processes are freed once their refs go: the
    handles the workers get do not pin them (a pickled ObjectRef would)."""
    import ray

    refs, manifest, *_ = trained
    buckets = ray.get(refs)
    size = manifest.total_bytes
    used = []
    for version in range(mp.version + 1, mp.version + 21):
        fresh_refs = [ray.put(b) for b in buckets]  # a new version's buckets
        mp.update_weights(fresh_refs, version=version, manifest=manifest)
        mp._weights = None  # the pool keeps the newest refs for restarts: drop them
        del fresh_refs
        gc.collect()
        # Ray frees asynchronously (slower on a loaded host): wait up to 10 s for the
        # store to come back under 2.5 versions; a pinned version never does
        deadline = time.monotonic() + 10
        while (now := object_store_bytes()) >= 2.5 * size and time.monotonic() < deadline:
            time.sleep(0.1)
        used.append(now)
    # Measured: 1, 2, 1, 2, ... versions (the fixture's own, and the last one while Ray
    # frees it asynchronously); twenty pinned versions would climb to 21.
    assert max(used) < 2.5 * size, [round(u / size, 2) for u in used]


def test_a_push_that_stalls_times_out_and_the_engine_is_restarted_and_pushed_again(
        trained, mp):
    """The engine does not read a push (the test hook ``stall``): after
    ``sync_timeout_s`` the pool restarts it and pushes to it alone; it then samples what
    the object-store sync of the same weights gives."""
    import ray

    refs, manifest, _, group = trained
    version = sync(mp, trained)
    synced = [c.token_ids for c in first(mp)]
    timeout, mp.sync_timeout_s = mp.sync_timeout_s, 5.0
    mp.linked.clear()  # the groups open again, with the short timeout
    try:
        ray.get(mp.actors[0].stall.remote(300, "receive_weights"))
        restarts = mp.restarts
        [got] = mp.push_from(group, version + 1, bucket_bytes=1 << 20)
    finally:
        mp.sync_timeout_s = timeout
    assert got == {"restarted": True} and mp.restarts == restarts + 1
    health = mp.health()[0]
    assert health["version"] == version + 1 and not health["broken"]
    assert [c.token_ids for c in first(mp)] == synced


def test_memory_stays_flat_over_twenty_pushes(trained, mp):
    """Neither the trainer's rank 0 nor the engine's processes keep what a push sent:
    their resident memory after push 20 is within a few pushes' bytes of push 5."""
    import os

    import psutil
    import ray

    *_, group = trained
    trainer_pid = ray.get(group.actors[0].__ray_call__.remote(lambda self: os.getpid()))
    engine_root = psutil.Process(mp.health()[0]["pid"])

    def resident() -> dict[str, int]:
        procs = {"trainer": psutil.Process(trainer_pid), "engine": engine_root,
                 **{f"engine child {p.pid}": p for p in engine_root.children(recursive=True)}}
        return {name: p.memory_info().rss for name, p in procs.items()}

    size = None
    for push in range(1, 21):
        [got] = mp.push_from(group, mp.version + 1, bucket_bytes=1 << 20)
        size = got["bytes"]
        if push == 5:
            before = resident()
    after = resident()
    growth = {name: after[name] - before.get(name, 0) for name in after}
    print(f"resident growth over pushes 5..20 (push of {size / 1e6:.1f} MB): "
          f"{ {k: round(v / 1e6, 1) for k, v in growth.items()} } MB")
    assert max(growth.values()) < 5 * size, growth


def test_what_leaves_the_trainer_for_bf16_engines_is_bf16(trained):
    """A push for bf16 engines, received by a bare process-group member in this process:
    rank 0 sends every tensor as bf16 (half the fp32 bytes), each the rounding of the
    trainer's weight; the object-store buckets for bf16 engines are bf16 too."""
    import threading

    import ray
    import torch

    from actors.weight_transfer import broadcast, open_group, split_bucket
    from actors.weights import iter_bucket_tensors

    refs, manifest, _, group = trained
    trained_weights = {n: t.clone() for ref in refs for n, t in iter_bucket_tensors(ray.get(ref))}
    plan = group.transfer_plan(1 << 20, "bfloat16")
    assert set(plan.dtype_names) == {"bfloat16"} and len(plan.bucket_sizes) > 1
    host, port = group.transfer_endpoint("inspect")
    received, sizes = {}, []

    def receive():
        pg = open_group(host, port, 1, 2, "gloo", timeout_s=60)
        for entries in plan.buckets():
            buffer = torch.empty(sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries),
                                 dtype=torch.uint8)
            broadcast(pg, buffer).wait()
            sizes.append(buffer.numel())
            received.update(split_bucket(buffer, entries))

    thread = threading.Thread(target=receive)
    thread.start()
    ray.get(group.join_transfer("inspect", 2, "gloo", 60))
    sent = group.send_weights(["inspect"], plan)
    thread.join(timeout=60)
    ray.get(group.actors[0].close_transfer.remote("inspect"))
    assert sent["failed"] == {} and sum(sizes) == sent["bytes"] == plan.total_bytes
    assert plan.total_bytes * 2 == manifest.total_bytes  # every tensor is floating point
    assert received.keys() == trained_weights.keys()
    for name, tensor in received.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, trained_weights[name].to(torch.bfloat16)), name
    buckets = [ray.get(ref) for ref in group.weight_buckets(1 << 20, "bfloat16")]
    assert len(buckets) > 1
    for name, tensor in (pair for b in buckets for pair in iter_bucket_tensors(b)):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, trained_weights[name].to(torch.bfloat16)), name


def test_a_lora_push_reaches_every_engine_shape_and_the_probe_matches_the_trainer(
        ray_cluster):
    """A LoRA trainer's adapter (after one optimizer step) served by an in-process, a
    multiprocess and a tensor-parallel-2 engine: the sync probe's log-probs equal the
    trainer's in each; before the adapter arrives the probe names the engine. The
    adapter's tensors leave the trainer in the engines' dtype."""
    import ray
    import torch
    from conftest import make_train_batch

    from actors.models import resolve_model
    from actors.objectives import ObjectiveSpec
    from actors.trainer import LoraSpec, TrainerSpec
    from actors.trainer_group import TrainerGroup
    from actors.weight_push import SyncMismatch, check
    from actors.weights import iter_bucket_tensors

    lora = LoraSpec(rank=4, alpha=8, dropout=0.0)
    group = TrainerGroup(TrainerSpec(model=MODEL, objective=ObjectiveSpec(kl_coef=0.0), lr=1e-2,
                                     reference=False, lora=lora, micro_batch_tokens=4096,
                                     threads=1),
                         1, name="test/shapes-lora-trainer",
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    lora_spec = {"enable_lora": True, "max_lora_rank": 8}
    pools = {}
    try:
        batch = make_train_batch(resolve_model(MODEL), n_prompts=2, n=2, seed=6)
        batch = batch.with_column(old_logprobs=group.compute_logprobs(batch))
        group.forward_backward(batch)
        group.optim_step()
        fp32 = ray.get(group.adapter(dtype="float32"))
        bf16 = ray.get(group.adapter(dtype="bfloat16"))
        wire = dict(iter_bucket_tensors(bf16["bucket"]))
        for name, tensor in iter_bucket_tensors(fp32["bucket"]):
            assert tensor.dtype == torch.float32 and wire[name].dtype == torch.bfloat16
            assert torch.equal(wire[name], tensor.to(torch.bfloat16)), name
        pools = {}  # started side by side (the starts dominate), checked one by one
        for role, shape in (("lora-inproc", {}), ("lora-mp", {"multiprocess": True}),
                            ("lora-tp", {"tensor_parallel": 2})):
            pools[role] = start(role, spec(**lora_spec, **shape), threads=2 if shape else 1,
                                wait=False)
        for role, pool in pools.items():
            pool.wait_ready()
            if role == "lora-inproc":  # the base, where the trainer serves its adapter
                with pytest.raises(SyncMismatch, match=pool.name(0)):
                    check(pool, group, 0, tol=1e-5)
            pool.load_adapter("policy", group.adapter(dtype="float32"), version=1)
            pool.default_adapter = "policy"
            diff = check(pool, group, 0, tol=1e-5)
            print(f"{role}: sync probe |engine - trainer| = {diff:.2e}")
            pool.shutdown()
    finally:
        for pool in pools.values():
            pool.shutdown()
        group.shutdown()
