"""Llama 2 on ONNX Runtime: export, run, chat and publish variants."""

from __future__ import annotations

import importlib.util
import sys

__version__ = "0.1.0"

# The packages `pip install -e .` brings; the entry points check them before importing the rest.
CORE_PACKAGES = ("numpy", "onnxruntime", "sentencepiece")


def require_core_packages() -> None:
    """Exit with one sentence (code 2) when a core dependency is missing, instead of letting an
    entry point die in an ImportError traceback (e.g. run with a Python outside the venv)."""
    missing = [name for name in CORE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
              f"for {sys.executable}; install with `python -m pip install -e .` in the repository "
              "(or run the command with the virtual environment's python, e.g. "
              ".venv/bin/python).", file=sys.stderr)
        raise SystemExit(2)
