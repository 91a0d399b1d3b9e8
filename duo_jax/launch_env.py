"""Multi-process start-up, from command-line flags or the launcher's environment.

In order of precedence:

* explicit settings: ``--coordinator_address=host:port --num_processes=N
  --process_id=i`` on ``duo_jax.main``, or the environment variables
  ``DUO_JAX_COORDINATOR``, ``DUO_JAX_NUM_PROCESSES`` and ``DUO_JAX_PROCESS_ID``
  (any cluster, or several processes on one machine);
* ``DUO_JAX_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` finds the
  settings itself (TPU pod slices, SLURM, Open MPI);
* neither: a single process.

Every process then sees every device of every process (``jax.devices()``),
and ``jax.process_index()`` says which one it is. On CPU the collectives
between processes go through gloo.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

from duo_jax.errors import UserError

_log = logging.getLogger(__name__)
_ENV_COORDINATOR, _ENV_NUM, _ENV_ID = "DUO_JAX_COORDINATOR", "DUO_JAX_NUM_PROCESSES", "DUO_JAX_PROCESS_ID"
_ENV_AUTO = "DUO_JAX_DISTRIBUTED"


def _int(value: str | int | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be an integer, got {value!r}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> dict | None:
    """The arguments for ``jax.distributed.initialize``, or None for a single process.

    Flags (the arguments) win over the environment, setting by setting.

    Returns:
      ``{}`` for auto-detection, ``{'coordinator_address', 'num_processes',
      'process_id'}`` for explicit settings, None when nothing asks for
      several processes (or explicitly for one).

    Raises:
      UserError: the settings are incomplete or inconsistent.
    """
    env = os.environ if env is None else env
    address = coordinator_address or env.get(_ENV_COORDINATOR) or None
    num = _int(num_processes if num_processes is not None else env.get(_ENV_NUM), "the number of processes")
    pid = _int(process_id if process_id is not None else env.get(_ENV_ID), "the process id")
    if address is None and num is None and pid is None:
        auto = env.get(_ENV_AUTO, "")
        if auto in ("", "0", "off"):
            return None
        if auto != "auto":
            raise UserError(f"{_ENV_AUTO}={auto!r} is not understood; set it to 'auto' or unset it")
        return {}
    if address is None or num is None or pid is None:
        raise UserError(
            "several processes need all three of --coordinator_address=HOST:PORT, --num_processes=N and "
            f"--process_id=I (or {_ENV_COORDINATOR}, {_ENV_NUM}, {_ENV_ID}); "
            f"got coordinator {address!r}, processes {num}, id {pid}"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.2:1234)")
    if num < 1:
        raise UserError(f"the number of processes must be at least 1, got {num}")
    if not 0 <= pid < num:
        raise UserError(f"process id {pid} is not in [0, {num}); number the processes 0 to {num - 1}")
    if num == 1:
        return None
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Calls ``jax.distributed.initialize`` when the flags or the environment ask for it.

    Must run before anything touches a jax device. A no-op when jax's
    distributed runtime is already up.
    """
    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is None or jax.distributed.is_initialized():
        return
    # CPU collectives between processes (the default in jax 0.10; explicit in case it changes).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    _log.info("process %d of %d, %d local and %d global devices", jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count())
