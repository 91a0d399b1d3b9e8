"""Multi-process start-up from the launcher's environment.

* ``DUO_JAX_COORDINATOR=host:port``, ``DUO_JAX_NUM_PROCESSES=N`` and
  ``DUO_JAX_PROCESS_ID=i``: explicit (any cluster, or several processes on one
  machine; on CPU the gloo collectives are selected).
* ``DUO_JAX_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` finds the
  settings itself (TPU pod slices, SLURM, Open MPI).
* neither: a single process.
"""

from __future__ import annotations

import os

import jax

from duo_jax.errors import UserError


def initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize`` when the environment asks for it."""
    env = os.environ
    if env.get("DUO_JAX_COORDINATOR"):
        try:
            num, pid = int(env["DUO_JAX_NUM_PROCESSES"]), int(env["DUO_JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("DUO_JAX_COORDINATOR needs DUO_JAX_NUM_PROCESSES and DUO_JAX_PROCESS_ID (integers)") from None
        if env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=env["DUO_JAX_COORDINATOR"], num_processes=num, process_id=pid)
    elif env.get("DUO_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
