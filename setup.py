"""The package list, the one thing pyproject.toml cannot say: every package under rapc/ by
discovery, plus rapc.configs, which pyproject maps to the top-level configs/ folder. A hand list
drifts (rapc.study was once missing from the wheel); tests/test_packaging.py checks the wheel."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["rapc", "rapc.*"]), "rapc.configs"])
