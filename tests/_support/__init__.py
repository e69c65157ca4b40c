"""Shared test support: float64 references, tiny models and data, host launchers, TensorBoard read-back.

Import as ``from _support.references import svd_statistics`` (``tests/`` is on ``sys.path`` through its
``conftest.py``). Modules that need Lightning or transformers import them at the top: import those only from
tests that need that host.
"""
