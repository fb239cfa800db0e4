"""Headless engine for SAE feature pathways in LLaMA-3.1-8B.

Importing this package is cheap: torch and transformers are imported lazily by the
steps that need them, so the explorer can import `engine.schema` and friends.
"""

__version__ = "0.1.0"
