"""DALL·E Mini / Mega text-to-image in JAX/Flax, with an embedded default model that runs offline."""

__version__ = "0.1.0"
