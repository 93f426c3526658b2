"""Installs the `iuq` package (source under projects/iuq).

The framework-independent core needs only torch and fvcore. The detectron2 / AdelaiDet parts
import those packages lazily: install them per their own guides (they are not on PyPI).
"""
from setuptools import find_packages, setup

setup(
    name="iuq",
    version="0.1.0",
    description="Instance-Unique Querying (NeurIPS 2022) training framework for detectron2 / "
    "AdelaiDet query-based instance segmenters",
    package_dir={"iuq": "projects/iuq"},
    packages=["iuq"] + ["iuq." + p for p in find_packages("projects/iuq")],
    python_requires=">=3.8",
    install_requires=["torch>=1.10", "fvcore>=0.1.5", "numpy"],
    extras_require={"test": ["pytest>=7"], "study": ["scipy", "matplotlib", "tabulate"]},
)
