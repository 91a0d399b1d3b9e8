"""Test-suite set-up, before jax starts.

XLA's CPU backend spends most of a small test's time compiling:

* optimization level 0 compiles about a quarter faster and runs these tiny
  models just as well;
* a persistent compilation cache, fresh for each pytest session, lets the many
  subprocess runs of the same small configs (resume, kill, bad-input tests)
  reuse each other's executables instead of compiling them again. A cached
  executable is the one XLA compiled for the same program and flags, so
  results are unchanged.

Subprocesses started by the tests inherit both through the environment.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="duo_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
