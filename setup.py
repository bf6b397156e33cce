"""Build script: metadata lives in pyproject.toml; this file exists to build the CUDA/C++
extension ``mae_fast._C`` (see csrc/)."""
from setuptools import setup

setup()
