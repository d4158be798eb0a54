"""Build script for fastbert; metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["fastbert", "fastbert.*"]))
