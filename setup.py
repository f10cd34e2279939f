"""Package layout glue: ship the repository's top-level ``kernels/`` folder as ``metaformer_zoo.kernels``.

Everything else lives in pyproject.toml. A top-level ``kernels`` (or ``configs``/``tools``/``tests``) package is
never installed into site-packages.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["metaformer_zoo", "metaformer_zoo.*"])
packages += ["metaformer_zoo.kernels"] + [f"metaformer_zoo.kernels.{p}" for p in find_packages("kernels")]

# the C source of the CPU selective scan is compiled on first use (kernels/selective_scan2d/cpu.py)
setup(packages=packages, package_dir={"metaformer_zoo.kernels": "kernels"},
      package_data={"metaformer_zoo.kernels.selective_scan2d": ["*.c"]})
