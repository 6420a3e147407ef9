"""Packaging for debias_ops.

The kernels live in ``kernels/`` in the source tree but are installed as
``debias_ops.kernels``: a bare top-level ``kernels`` package would clash with
another PyPI distribution of that name (design §7).
"""
from setuptools import setup

setup(
    name="debias_ops",
    version="0.1.0",
    description="Fused Triton kernels for DropClass (debiased semantic segmentation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested: 3.11 and 3.12 (docs/versions.md)
    packages=["debias_ops", "debias_ops.kernels", "debias_ops.recipe"],
    package_dir={"debias_ops": "debias_ops", "debias_ops.kernels": "kernels"},
    entry_points={"console_scripts": ["debias-ops-train = debias_ops.recipe.cli:entry"]},
    install_requires=[
        # the oldest torch the tests run on (.venv-torch211); on Linux x86-64, PyPI's torch < 2.10
        # pins a Triton < 3.6, so nothing older installs beside triton>=3.6 anyway
        "torch>=2.11",
        "numpy",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "train": ["torchvision", "segmentation-models-pytorch", "torchmetrics", "cityscapesscripts", "tqdm",
                  "matplotlib", "scipy"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "ruff", "torchvision",
                 "segmentation-models-pytorch", "torchmetrics", "cityscapesscripts", "tqdm", "matplotlib", "scipy"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "tqdm", "matplotlib"],
    },
    license="MIT",
)
