"""duo_jax: BinaryDuo binary-activation networks in JAX/Flax."""

__version__ = "0.1.0"
