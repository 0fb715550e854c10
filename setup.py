"""Build hook: the package is pure Python; the optional CUDA extension is added by
csrc/ when nvcc and a CUDA build of torch are present (see csrc/README.md)."""
from setuptools import setup

setup()
