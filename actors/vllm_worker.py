"""Weight sync inside vLLM's workers: the ``worker_extension_cls`` of every engine.

vLLM mixes ``WeightSync`` into its worker class, so ``coevolve_load_weights``
runs wherever the model lives: in the engine's own process for an in-process
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, a laptop's fast start), and in
every worker process of a multiprocess or tensor-parallel engine, each of
which loads its own shard. One code path for every engine shape:
``GeneratorActor.update_weights`` calls ``collective_rpc`` with the same
arguments in every case.

How buckets reach a worker. The worker fetches them from the Ray object store
itself (zero copy on the node: read-only views of shared memory). The engine
process hands it *ref handles* (object id, owner address, status), not
pickled ``ObjectRef``s: Ray pins an object whose ref is pickled outside a Ray
call for as long as the pickling process lives, which would keep every
weight version alive in the engine actor. A handle is turned back into a ref
in the worker (registered as a borrow of the same owner) and dropped after
its bucket is loaded. The engine actor holds the refs for the duration of
the call, so the objects cannot be freed while a worker reads them. A worker
process that vLLM spawned is not a Ray worker: on its first sync it joins
the cluster as a driver (``ray.init`` at ``RAY_ADDRESS``, which the engine
process sets).

Loading goes through vLLM's reload path (``model_runner.reload_weights``),
which re-runs the model's weight processing: CPU kernels re-pack weights, so
copying into the parameters directly would be wrong. Buckets are fetched one
at a time, so a worker holds at most one bucket beyond its model.
"""

from __future__ import annotations

import os
import time

# The environment variable through which the engine process tells its workers
# where the Ray cluster is (vLLM sets RAY_ADDRESS itself only when it forces
# the spawn start method).
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ref_handle(ref) -> tuple[bytes, bytes, bytes]:
    """(object id, owner address, status) of an ObjectRef, without pinning the object."""
    import ray

    worker = ray._private.worker.global_worker
    worker.check_connected()
    ref, owner_address, status = worker.core_worker.serialize_object_ref(ref)
    return ref.binary(), owner_address, status


def ref_from_handle(handle: tuple[bytes, bytes, bytes]):
    """The ObjectRef of ``ref_handle``'s result, registered as a borrow in this process."""
    from ray._private.serialization import _object_ref_deserializer

    binary, owner_address, status = handle
    return _object_ref_deserializer(binary, "", owner_address, status, None)


def connect_ray() -> None:
    """Join the engine's Ray cluster from a process vLLM spawned (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get(RAY_ADDRESS_ENV)
    if not address:
        raise RuntimeError(f"vLLM worker {os.getpid()}: {RAY_ADDRESS_ENV} is not set, so the "
                           "weight buckets cannot be fetched from the object store")
    ray.init(address=address, log_to_driver=False, logging_level="WARNING",
             configure_logging=False, namespace="coevolve-vllm-workers")


class WeightSync:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``)."""

    def coevolve_load_weights(self, handles: list, names: list[str]) -> dict:
        """Reload the model from the buckets behind ``handles``; their tensors must be
        exactly ``names``, in order. Returns this worker's timing."""
        import ray

        from actors.weights import iter_bucket_tensors

        connect_ray()
        timing = {"get_seconds": 0.0, "pid": os.getpid()}

        def tensors():
            i = 0
            for handle in handles:
                t0 = time.perf_counter()
                ref = ref_from_handle(handle)
                bucket = ray.get(ref)
                del ref
                timing["get_seconds"] += time.perf_counter() - t0
                for name, tensor in iter_bucket_tensors(bucket):
                    if i >= len(names) or name != names[i]:
                        raise ValueError(f"bucket tensor {name!r} does not follow the manifest")
                    i += 1
                    yield name, tensor
                del bucket
            if i != len(names):
                raise ValueError(f"buckets held {i} tensors, the manifest {len(names)}")

        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        timing["reload_seconds"] = time.perf_counter() - t0
        return timing
