"""Test-suite set-up, before jax starts.

XLA's CPU backend spends most of a small test's time compiling; optimization
level 0 compiles about a quarter faster and runs these tiny models just as
well. Subprocesses started by the tests inherit it.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
