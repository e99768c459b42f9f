r"""Video colourisation (Vondrick et al. 2018) on synthetic sprite videos: tracking emerges in CPU minutes.

  python -m sslx.main --config=configs/video_colorization_synthetic.py --workdir=runs/vcol_sprites
  python experiments/video_propagation.py --workdir=runs/vcol_sprites --out=runs/vcol_sprites/propagation.json

The recipe: `sslx.recipes_video.video_colorization_synthetic` (32 px clips of 4 frames, a 4-block ViT-Ti/4,
no image monitors: the data has no image labels). ``:test`` shrinks it to 6 steps of a one-block ViT on 16 px
frames, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes_video


def get_config(arg=None):
  test = config_args.parse_arg(arg, test=False).test
  return config_lib.finalize(recipes_video.video_colorization_synthetic(test))
