"""Data parallelism: one mesh axis over every device of every process.

The batch is split on the ``data`` axis, the train state is replicated, and
``jit`` places the collectives. BatchNorm has no ``axis_name``: its statistics
are over the global batch, so the result does not depend on the device count.
"""

from __future__ import annotations

from typing import Any

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
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, what: str = "batch_size") -> None:
    """The global batch must split evenly over the devices."""
    n = jax.device_count()
    if global_batch_size % n:
        raise UserError(
            f"{what}={global_batch_size} is not divisible by the {n} devices; use a multiple of {n}"
        )


def put_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array whose rows are the processes' local batches, in process order."""
    return jax.make_array_from_process_local_data(sharding, local)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Replicates a pytree (e.g. the train state) on every device."""
    return jax.device_put(tree, replicated(mesh))
