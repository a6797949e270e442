"""l2r: Learning to Remember from a Multi-Task Teacher, in JAX."""

__version__ = "0.1.0"
