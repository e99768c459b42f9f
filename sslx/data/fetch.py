"""Puts the embedded default data set (Fashion-MNIST IDX files) where sslx looks for it.

    python -m sslx.data.fetch

1. Already in /usr/share/datasets/fashion-mnist or ~/.cache/sslx/fashion-mnist: nothing to do.
2. Debian/Ubuntu as root: ``apt-get install dataset-fashion-mnist``.
3. Otherwise: download the four files from the Fashion-MNIST site into ~/.cache/sslx/fashion-mnist.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

from sslx.data.sources import FASHION_MNIST_DIRS

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def find_fashion_mnist() -> str | None:
  """The first default directory that holds all four files, or None."""
  for directory in FASHION_MNIST_DIRS:
    if all(os.path.exists(os.path.join(directory, name)) for name in FASHION_MNIST_FILES):
      return directory
  return None


def _apt_install() -> bool:
  if shutil.which("apt-get") is None or os.geteuid() != 0:
    return False
  print("Installing Debian's dataset-fashion-mnist ...", flush=True)
  for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
    if subprocess.run(command, check=False).returncode != 0:
      return False
  return find_fashion_mnist() is not None


def _download(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  for name in FASHION_MNIST_FILES:
    print(f"Downloading {_FASHION_MNIST_URL}{name} ...", flush=True)
    partial = os.path.join(directory, name + ".part")
    urllib.request.urlretrieve(_FASHION_MNIST_URL + name, partial)
    os.replace(partial, os.path.join(directory, name))


def ensure_fashion_mnist() -> str:
  """Returns a directory holding the Fashion-MNIST IDX files, installing or downloading them if needed."""
  found = find_fashion_mnist()
  if found or _apt_install():
    return find_fashion_mnist()
  _download(FASHION_MNIST_DIRS[-1])
  return FASHION_MNIST_DIRS[-1]


def main() -> None:
  print(f"Fashion-MNIST: {ensure_fashion_mnist()}")


if __name__ == "__main__":
  sys.exit(main())
