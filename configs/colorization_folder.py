r"""Colorization (Zhang et al. 2016) on a folder of colour images (any photographs; no labels needed).

  python -m sslx.main --config=configs/colorization_folder.py --config.data.data_dir=/my/photos \
      --workdir=runs/colorization
  python -m sslx.main --config=configs/colorization_folder.py:encoder=resnet \
      --config.data.data_dir=/my/photos --workdir=runs/colorization_resnet

Reads `data_dir/train` if it exists, else `data_dir` (`sslx.data.folder`). The recipe:
`sslx.recipes_color.colorization_folder`; `:test` shrinks it to 6 steps of a tiny encoder on 32 px crops, for
the tests.
"""
from sslx import recipes_color


def get_config(arg=None):
  return recipes_color.colorization_folder(arg)
