r"""Video colourisation (Vondrick et al. 2018) on a Kinetics-like folder of videos, the paper's settings.

  python -m sslx.main --config=configs/video_colorization_folder.py --workdir=runs/vcol_kinetics \
      --config.data.data_dir=/data/kinetics_frames

``data_dir`` (or its ``train`` sub-folder) holds videos at any depth: folders of frame images sorted by name,
or video files (decoded by PyAV, ``pip install av``). The recipe, and how it differs from the paper:
`sslx.recipes_video.video_colorization_kinetics`. ``:local`` runs 20 steps of a width-8 ResNet-18 on 32 px
frames of the same folder, a check of the set-up on a CPU.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes_video


def get_config(arg=None):
  local = config_args.parse_arg(arg, local=False).local
  return config_lib.finalize(recipes_video.video_colorization_kinetics(local))
