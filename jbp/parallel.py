"""Devices and processes for a data-parallel run: JAX's own SPMD, a few helpers around it.

    jbp.parallel.initialize_distributed()        # no-op unless launched as several processes
    mesh = jbp.parallel.data_mesh()              # every device JAX sees, one axis "data"
    step = jbp.train.make_train_step(model.apply, optimizer, mesh=mesh)
    state = jbp.parallel.replicate(state, mesh)
    for x, y in batches:                         # the same global batch in every process
        state, metrics = step(state, *jbp.parallel.global_batch(mesh, x, y))

Each process contributes only its rows of the global batch
(``jax.make_array_from_process_local_data``); parameters, optimiser and batch-norm state are
replicated. :func:`local_view` gives a process's own copy of a replicated tree (to evaluate,
checkpoint or log it without cross-process transfers). docs/scaling.md.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: The mesh axis a data-parallel step shards the batch over (``jbp.train`` uses it).
DATA_AXIS = "data"

# Environment variables that mark a process started by a cluster launcher JAX recognises.
_CLUSTER_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


#: ``train.data_parallel``: "auto" shards each batch over every device JAX sees, "off" runs on one.
DATA_PARALLEL = ("auto", "off")

def initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when this process is one of several; else nothing.

    Several: ``JAX_COORDINATOR_ADDRESS`` is set (``scripts/launch.py`` also sets
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, passed on here), or a SLURM / Open MPI job of
    more than one task, whose settings JAX detects itself. On CPU the processes' collectives use
    gloo. Returns whether it initialised. Call it before anything else touches a device.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = any(int(os.environ.get(k, "1") or 1) > 1 for k in _CLUSTER_HINTS)
    if not explicit and not cluster:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit and os.environ.get("JAX_NUM_PROCESSES"):
        kwargs = dict(coordinator_address=explicit,
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]),
                      initialization_timeout=int(os.environ.get("JBP_INIT_TIMEOUT", "120")))
    jax.distributed.initialize(**kwargs)
    return True


def data_mesh(devices: Optional[Any] = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over ``devices`` (default: every device of every process).

    ``jax.sharding.Mesh`` gives ``AxisType.Auto`` axes; ``jax.make_mesh``'s default Explicit
    axes work with ``make_train_step`` too.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_data_mesh(mesh, purpose: str) -> int:
    """The number of devices on ``mesh``'s ``"data"`` axis; a jbp error naming ``purpose`` (what
    the caller splits over that axis, e.g. "a data-parallel step shards the batch") if ``mesh``
    is not a ``jax.sharding.Mesh`` or has no such axis."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh: {purpose} over a mesh axis named {DATA_AXIS!r}; this mesh has "
                         f"axes {tuple(mesh.axis_names)}. Build one with jbp.parallel.data_mesh() "
                         f"or jax.sharding.Mesh(np.array(jax.devices()), ('data',))")
    return mesh.shape[DATA_AXIS]


def replicate(tree, mesh: Mesh):
    """Put every leaf of ``tree`` (the same values in every process) on all of ``mesh``.

    ``jax.device_put`` cannot target other processes' devices, so each process hands its own
    copy to ``jax.make_array_from_process_local_data`` (PRNG keys travel as their key data).
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_process_local_data(sharding, host, host.shape)
    return jax.tree.map(put, tree)


def _process_rows(sharding: NamedSharding, shape) -> Tuple[int, int]:
    """The rows ``[lo, hi)`` of a batch sharded by ``sharding`` that this process holds."""
    spans = [idx[0].indices(shape[0])[:2]
             for idx in sharding.addressable_devices_indices_map(tuple(shape)).values()]
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    return lo, hi


def global_batch(mesh: Mesh, *arrays):
    """Global arrays sharded over ``mesh``'s ``"data"`` axis from the same global batch.

    Every process passes the whole global batch (host arrays, identical in every process, as a
    shared seed makes them) and contributes only its own rows. A batch that does not divide by
    the axis size is an error naming both numbers.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    n = mesh.shape[DATA_AXIS]
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.shape[0] % n:
            raise ValueError(f"batch: {a.shape[0]} examples do not divide over the {n} devices "
                             f"of the mesh's {DATA_AXIS!r} axis; use a batch size that is a "
                             f"multiple of {n}")
        lo, hi = _process_rows(sharding, a.shape)
        out.append(jax.make_array_from_process_local_data(sharding, a[lo:hi], a.shape))
    return tuple(out)


def process_batch(mesh: Mesh, *arrays):
    """Global arrays sharded over ``mesh``'s ``"data"`` axis from each process's own rows: a
    loader that reads a shard per process (``jbp.data.FolderSource``) gives each process
    ``global batch / process_count`` examples, which become its rows of the global batch."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return tuple(jax.make_array_from_process_local_data(
        sharding, np.asarray(a), (np.shape(a)[0] * jax.process_count(),) + np.shape(a)[1:])
        for a in arrays)


def local_view(tree):
    """This process's own copy of each replicated leaf (a one-device array), for evaluation,
    checkpoints and logs. Leaves that are not sharded arrays pass through."""
    def local(a):
        if isinstance(a, jax.Array) and len(a.sharding.device_set) > 1:
            if not a.is_fully_replicated:
                raise ValueError("local_view: expected a replicated array, got one sharded as "
                                 f"{a.sharding}")
            return a.addressable_data(0)
        return a
    return jax.tree.map(local, tree)


def is_main_process() -> bool:
    """Process 0 writes checkpoints, metrics, summaries and plots; the others only compute."""
    return jax.process_index() == 0
