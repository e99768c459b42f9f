r"""DINO on Fashion-MNIST with the quick start's ViT-Ti/4 (4 blocks): pretrains on a CPU in 2 epochs.

  python -m sslx.main --config=configs/dino_fashion_mnist.py --workdir=runs/dino_fmnist
  python -m sslx.attention_maps --workdir=runs/dino_fmnist --out=attn.png

2 global crops of 28 px and 4 local crops of 16 px, grey-image augmentations, 4096 prototypes; the recipe:
`sslx.recipes_distillation.dino_fashion_mnist`. The teacher's attention maps are drawn into
``<workdir>/pictures`` during training.

Arguments: ``epochs=N`` (default 2); ``test``: 6 steps at batch 16 of a ViT of width 32 with 2 blocks, 2 global and
2 local crops and a head of 32-32-16 onto 64 prototypes, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_distillation
from sslx.models import dino_head


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, test=False)
  config = recipes_distillation.dino_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    recipes.shrink_fashion_mnist_for_tests(config)
    config.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    config.batch_size = 16
    config.method.head = dino_head.dino_head_config(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    config.data.views = config.data.views[:4]
    config.update(dict(viz_every_steps=3, viz_num_images=2))
  return config_lib.finalize(config)
