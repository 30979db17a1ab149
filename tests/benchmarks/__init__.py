"""Tests of `make bench`'s script, benchmarks/run.py, loaded as the module `bench`."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

_spec = importlib.util.spec_from_file_location("bench", BENCHMARKS / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
