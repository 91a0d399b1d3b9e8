"""Data parallelism: one mesh axis over every device of every process.

The batch is split on the ``data`` axis, the train state is replicated, and
``jit`` places the collectives. BatchNorm has no ``axis_name``: its statistics
are over the global batch, so the result does not depend on the device count
(up to the order of floating-point sums).

Multi-process: every process runs the same program; each builds only its own
rows of a batch and :func:`put_batch` assembles the global array, rows in
process order. The train state is the same on every process, and
:func:`put_replicated` places it on every device of every process.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from duo_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over all devices (all processes).

    The axis is ``Auto`` (the compiler propagates shardings): jax 0.10's
    default ``Explicit`` axes would put shardings into the types, and model
    code would then have to annotate every op that mixes a sharded batch with
    unsharded values (a dropout mask, a padding).
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, what: str = "batch_size") -> None:
    """The global batch must split evenly over the devices.

    Raises:
      UserError: it does not; the message names the nearest valid sizes.
    """
    n = jax.device_count()
    if global_batch_size <= 0 or global_batch_size % n:
        lower = max(n, global_batch_size // n * n)
        raise UserError(
            f"{what}={global_batch_size} is not divisible by the {n} devices; use a multiple of {n} "
            f"(e.g. --config.{what}={lower} or {lower + n})"
        )


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
    """``jax.jit`` of ``step_fn(state, batch) -> (state, metrics)`` for data parallelism.

    State in and out replicated, batch split on the ``data`` axis, metrics
    replicated; the incoming state is donated (its buffers hold the new one).
    """
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(eval_fn: Callable, mesh: Mesh) -> Callable:
    """``jax.jit`` of ``eval_fn(variables, batch, apply_fn) -> metrics`` (``apply_fn`` static).

    Variables replicated, batch split on the ``data`` axis, metrics replicated.
    """
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(eval_fn, in_shardings=(rep, data), out_shardings=rep, static_argnums=2)


def put_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array whose rows are the processes' local batches, in process order."""
    return jax.make_array_from_process_local_data(sharding, local)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Replicates a pytree (e.g. the train state) on every device of ``mesh``.

    With several processes every process must pass the same values (the
    state is built from the same seed everywhere); a leaf that is already a
    global array is resharded.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process.

    With several processes this is a collective: every process must call it
    at the same point of the program, or they wait for each other forever.
    """
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on some process (a collective, as :func:`all_processes`)."""
    return not all_processes(not flag)
