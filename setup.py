"""sslx: self-supervised visual representation learning in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="sslx",
    version="0.1.0",
    description="Self-supervised visual representation learning in JAX/Flax (MAE, contrastive, pretext tasks).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sslx", "sslx.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "numpy>=1.26",
        "pillow>=10",
        "absl-py>=2",
        "tensorboardX>=2.6.5",
    ],
    extras_require={
        # PyTorch peers for parity tests only; never imported by sslx at runtime.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "torch==2.13.0",
            "transformers>=4.45",
            "scikit-learn>=1.5",
            "scikit-image>=0.24",
            "tensorboard>=2.15",
            "ruff>=0.6",
        ],
    },
)
