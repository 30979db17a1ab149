"""Importing warp_rlhf changes nothing process-wide in matplotlib: a notebook's backend stays its
own, and pyplot (with its global figure manager) is never imported by the library."""

import subprocess
import sys

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import matplotlib
matplotlib.use("svg")
import warp_rlhf
for module in pkgutil.walk_packages(warp_rlhf.__path__, "warp_rlhf."):
    importlib.import_module(module.name)
print(matplotlib.rcParams["backend"], "matplotlib.pyplot" in sys.modules)
"""


def test_importing_every_module_keeps_the_backend_and_leaves_pyplot_alone():
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
