r"""DINO and MoCo v3 ViT training-step throughput: sslx against a PyTorch step of the same model, same run.

What is timed: one training step on one fixed synthetic batch of ``N`` images, each in all its crops, held on
the device before timing (no input pipeline): the forward passes, the loss, the backward pass, the optimizer
update and the teacher's (momentum encoder's) EMA update. ``images/s`` counts images: ``N`` per step, whatever
the number of crops. The median of ``--steps`` individually synchronised steps after ``--warmup`` untimed ones.

- ``--method=dino`` (`configs/dino_vits16.py`): ViT-S/16 (learned position table, drop path 0.1) under DINO's
  head (2048-2048-256 onto 65,536 prototypes, trained norms); the student sees the 2 global 224 px crops and 8
  local 96 px crops (one encoder call per crop size), the EMA teacher the global crops; DINO's loss with its
  centre; AdamW; gradients clipped at global norm 3; the last head layer frozen (the first epoch's state).
- ``--method=mocov3`` (`configs/mocov3_vitb.py`): ViT-B/16 (fixed sin-cos positions, the patch projection
  frozen: stop-grad-conv1) under a 3-layer projector and a 2-layer predictor (4096 hidden, 256 out, BatchNorm);
  2 views of 224 px, each its own pass through the online network and the momentum encoder; the symmetrised
  InfoNCE loss at t = 0.2 over the batch; AdamW, weight decay 0.1 on everything.

sslx: the recipe's config through ``sslx.train.make_train_step``, jitted with a donated state. Peer: timm's
``VisionTransformer`` of the same depth, width, heads, patch and drop-path rate (class token pooled, LayerNorm
eps 1e-6, no position for the class token as in sslx) with lightly's heads and losses (DINO:
``DINOProjectionHead``, ``DINOLoss``, ``cancel_last_layer_gradients``; MoCo v3: lightly's ``ProjectionHead``
built from sslx's head config, bias-free linear + BatchNorm with the last BatchNorm without affine parameters,
the loss written in torch), ``torch.optim.AdamW``, eager (``--peer_compile``: ``torch.compile`` on the networks).
Both sides read the same pixels and compute in ``--dtype``: float32 on a CPU; bfloat16 on a GPU (torch under
``autocast``), losses in float32. Where they differ:

- Schedules: sslx computes the learning rate, weight decay, teacher temperature and EMA momentum from the step
  counter inside the step; the peer holds them constant (host scalars: no device work either way).
- Metrics: sslx's step also returns the gradient and parameter norms and DINO's teacher entropy, KL and
  collapse flag (a few reductions); the peer only its loss. As the gradient norm covers every parameter, sslx
  also computes MoCo v3's frozen patch projection's gradient (under 1% of the step), which torch skips.
- Clipping (DINO): both clip the global gradient norm, as sslx's recipe does; DINO's reference code clips each
  parameter's gradient norm on its own.
- Position table (DINO): both resize the learned table bicubically for the local crops, timm with
  antialiasing, sslx without (as DINO's reference); MoCo v3's sin-cos table is sslx's own on both sides
  (timm's table filled with it and frozen).
- Frozen last layer (DINO): sslx passes it a zero gradient and a zero update; lightly drops its computed
  gradient before the update, so AdamW skips it. Both compute its weight gradient.
- Attention: cuDNN flash attention through ``jax.nn.dot_product_attention`` (sslx, GPU) against torch's
  ``scaled_dot_product_attention`` (timm); XLA's and torch's own kernels on a CPU.

  python experiments/bench_distillation_step.py --method=dino --local --batch_size=2 --steps=1 --warmup=1  # CPU
  python experiments/bench_distillation_step.py --method=dino --batch_size=64 --steps=20 --json_out=d.jsonl  # GPU
  python experiments/bench_distillation_step.py --method=mocov3 --batch_size=64 --steps=20 --json_out=d.jsonl

``--local``: the configs' ``:local`` variants (width 8, 2 blocks, 32 px global and 16 px local crops, a small
DINO head); ``--depth``, ``--image_size``, ``--local_size`` and ``--local_crops`` override the recipe's. The
peer needs timm and torchvision beside this CPU torch, neither in the venv: ``pip install --no-deps
--target=/tmp/timm timm``, ``pip install --no-deps --target=/tmp/tvt torchvision==0.28.0``, then run with
``PYTHONPATH=/tmp/timm:/tmp/tvt`` (`torch_peers.timm_vision_transformer`); lightly loads as in
``tests/lightly_peer.py``. ``--peer=none`` needs none of them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
from typing import Optional

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np

from sslx import models
from sslx import optim
from sslx import recipes_distillation
from sslx import train
from sslx import xla_options
from sslx.methods import RunLength, build_method, dino, mocov3
from sslx.methods import validate_config as validate_method_config
from sslx.models import pos_embed

from step_timing import median_step_seconds, time_sslx_step
import torch_peers

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # sets the length of the recipes' schedules
_TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
RECIPES = {"dino": (recipes_distillation.dino_vit_imagenet, "S/16"),
           "mocov3": (recipes_distillation.mocov3_vit_imagenet, "B/16")}


@dataclasses.dataclass(frozen=True)
class Options:
  """What to time (the flags of `main`); None: the recipe's value."""
  method: str = "dino"
  batch_size: int = 16
  steps: int = 5
  warmup: int = 1
  dtype: str = "auto"
  peer: str = "torch"
  peer_compile: bool = False
  local: bool = False
  depth: Optional[int] = None
  image_size: Optional[int] = None
  local_size: Optional[int] = None
  local_crops: Optional[int] = None
  json_out: Optional[str] = None


def resolve_dtype(name: str) -> str:
  """``'auto'``: bfloat16 on an accelerator, float32 on a CPU."""
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def build_config(options: Options):
  """The recipe's config with the batch, dtype, depth and crops of ``options``, validated."""
  recipe, variant = RECIPES[options.method]
  config = recipe(variant, "local" if options.local else None)
  config.batch_size = options.batch_size
  config.model.dtype = resolve_dtype(options.dtype)
  if options.depth is not None:
    config.model.depth = options.depth
  size = options.image_size or config.data.image_size
  config.data.image_size = size
  if options.method == "dino":
    config.data.views = _dino_views(config, size, options)
  elif options.image_size is not None:
    config.data.views = recipes_distillation.mocov3_views(size)
  models.validate_config(config.model, size)
  validate_method_config(config)
  return config


def _dino_views(config, global_size: int, options: Options) -> tuple[str, ...]:
  num_global = int(config.method.num_global_crops)
  sizes = dino.crop_sizes(config)
  num_local = len(sizes) - num_global if options.local_crops is None else options.local_crops
  local_size = options.local_size or (sizes[num_global] if len(sizes) > num_global else global_size // 2)
  return recipes_distillation.dino_views(global_size, local_size, num_local)


def synthetic_crops(config) -> list[np.ndarray]:
  """One fixed float32 ``(N, s, s, 3)`` array per view of ``config.data.views``, ``s`` its crop size."""
  rng = np.random.default_rng(0)
  return [rng.standard_normal((config.batch_size, size, size, 3), np.float32) for size in dino.crop_sizes(config)]


def bench_sslx(config, crops: list[np.ndarray], options: Options) -> dict:
  """sslx's jitted, state-donating train step on ``crops`` (batch keys ``view_i``)."""
  steps_per_epoch, total_steps = train.schedule_length(config, IMAGENET_TRAIN_EXAMPLES)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  method = build_method(config, RunLength(steps_per_epoch, total_steps))
  size = config.data.image_size
  state = xla_options.jit(lambda rng: nn.unbox(train.init_train_state(method, tx, rng, (size, size, 3))))(
      jax.random.PRNGKey(config.seed))
  inputs = {f"view_{i}": jax.device_put(crop) for i, crop in enumerate(crops)}
  return time_sslx_step(method, tx, schedules, state, inputs, warmup=options.warmup, steps=options.steps)


def _lightly_class(module_name: str, class_name: str):
  """lightly's ``class_name`` from ``module_name``, loaded as ``tests/lightly_peer.py`` loads its losses."""
  if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
  import lightly_peer  # pylint: disable=g-import-not-at-top
  return lightly_peer._lightly_class(module_name, class_name)  # pylint: disable=protected-access


def _timm_vit(encoder, image_size: int, *, drop_path_rate: float, dynamic: bool):
  """timm's ViT with the dimensions of sslx's ``encoder`` (a `vit.VisionTransformer`), returning the class
  token after the final LayerNorm; ``dynamic``: resizes its position table to any crop grid."""
  if encoder.pooling != "cls" or encoder.layer_norm_eps != 1e-6:
    raise ValueError("the timm peer pools the class token and uses LayerNorm eps 1e-6, as sslx's recipes do")
  vision_transformer = torch_peers.timm_vision_transformer()
  return vision_transformer(img_size=image_size, patch_size=encoder.patch_size, num_classes=0,
                            embed_dim=encoder.width, depth=encoder.depth, num_heads=encoder.num_heads,
                            mlp_ratio=encoder.mlp_dim / encoder.width, no_embed_class=True,
                            dynamic_img_size=dynamic, drop_path_rate=drop_path_rate)


def _ema(teacher_params: list, student_params: list, momentum: float):
  """``teacher <- m teacher + (1 - m) student`` over whole parameter lists."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)  # pylint: disable=protected-access


def _adamw(config, groups: list[dict]):
  """torch's AdamW with the recipe's betas and its peak learning rate (base_lr x batch / lr_batch_base)."""
  import torch  # pylint: disable=g-import-not-at-top
  opt = config.optimizer
  lr = opt.base_lr * config.batch_size / opt.get("lr_batch_base", 256)
  return torch.optim.AdamW(groups, lr=lr, betas=(opt.b1, opt.b2))


def _frozen(*modules) -> None:
  for module in modules:
    module.requires_grad_(False)


def torch_dino_step(config, crops: list, autocast, compile_fn):
  """The peer's DINO step on the torch tensors ``crops``; returns ``run_step() -> loss``."""
  import torch  # pylint: disable=g-import-not-at-top
  encoder, mc, head = models.encoder_from_config(config.model), config.method, config.method.head
  if head.num_layers != 3:
    raise ValueError("lightly's DINOProjectionHead has 3 layers")
  device, size, num_global = crops[0].device, config.data.image_size, int(mc.num_global_crops)
  student = _timm_vit(encoder, size, drop_path_rate=encoder.drop_path_rate, dynamic=True)
  teacher = _timm_vit(encoder, size, drop_path_rate=0.0, dynamic=True)
  teacher.load_state_dict(student.state_dict())
  make_head = functools.partial(
      _lightly_class("lightly.models.modules.heads", "DINOProjectionHead"), encoder.width, head.hidden_dim,
      head.bottleneck_dim, head.out_dim, batch_norm=head.batch_norm,
      freeze_last_layer=math.ceil(mc.freeze_last_layer_epochs), norm_last_layer=head.norm_last_layer)
  student_head, teacher_head = make_head(), make_head()  # weight norm's computed weight cannot be deep-copied
  teacher_head.load_state_dict(student_head.state_dict())
  _frozen(teacher, teacher_head)
  student_params = [*student.parameters(), *student_head.parameters()]
  teacher_params = [*teacher.parameters(), *teacher_head.parameters()]
  for module in (student, teacher, student_head, teacher_head):
    module.to(device).train()
  criterion = _lightly_class("lightly.loss.dino_loss", "DINOLoss")(
      output_dim=head.out_dim, teacher_temp=mc.warmup_teacher_temperature, student_temp=mc.student_temperature,
      center_momentum=dino.CENTER_MOMENTUM).to(device)
  trainable = [p for p in student_params if p.requires_grad]
  # DINO's groups: parameters of more than one dimension decay, biases and norms do not.
  optimizer = _adamw(config, [{"params": [p for p in trainable if p.ndim > 1],
                               "weight_decay": config.optimizer.weight_decay},
                              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}])
  clip = config.optimizer.get("grad_clip_norm")
  student_net, teacher_net = compile_fn(student), compile_fn(teacher)
  student_mlp, teacher_mlp = compile_fn(student_head), compile_fn(teacher_head)
  groups = dino.resolution_groups([crop.permute(0, 2, 3, 1) for crop in crops])  # NCHW -> NHWC views

  def run_step():
    with autocast():
      features = [None] * len(crops)
      for group in groups:
        parts = student_net(torch.cat([crops[j] for j in group])).chunk(len(group))
        for i, part in zip(group, parts, strict=True):
          features[i] = part
      student_logits = student_mlp(torch.cat(features)).float().chunk(len(crops))
      with torch.no_grad():
        teacher_logits = teacher_mlp(teacher_net(torch.cat(crops[:num_global]))).float().chunk(num_global)
    loss = criterion(list(teacher_logits), list(student_logits), teacher_temp=mc.warmup_teacher_temperature)
    loss.backward()
    student_head.cancel_last_layer_gradients(current_epoch=0)
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(trainable, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _ema(teacher_params, student_params, mc.momentum)
    return loss

  return run_step


def _mocov3_mlp(head, in_dim: int):
  """sslx's `heads.ProjectionHead` of the ``head`` section as lightly's ``ProjectionHead``: linear layers
  (biased only without BatchNorm), BatchNorm after each (the last one's affine only with
  ``last_batch_norm_scale``), ReLU between."""
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  blocks, width = [], in_dim
  for i in range(head.num_layers):
    last = i == head.num_layers - 1
    out = head.out_dim if last else (head.hidden_dim or width)
    norm = None
    if head.batch_norm and (head.last_batch_norm or not last):
      norm = tnn.BatchNorm1d(out, affine=not last or head.last_batch_norm_scale)
    blocks.append((width, out, norm, None if last else tnn.ReLU(), not head.batch_norm))
    width = out
  return _lightly_class("lightly.models.modules.heads", "ProjectionHead")(blocks)


def mocov3_loss(queries, keys, temperature: float):
  """``2t CE(q . k^T / t, diagonal)`` of L2-normalised rows (one direction of `sslx.losses.mocov3_loss`)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  logits = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / temperature
  return 2 * temperature * F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def torch_mocov3_step(config, views: list, autocast, compile_fn):
  """The peer's MoCo v3 step on the torch tensors ``views``; returns ``run_step() -> loss``."""
  import torch  # pylint: disable=g-import-not-at-top
  encoder, mc = models.encoder_from_config(config.model), config.method
  size = config.data.image_size
  base = _timm_vit(encoder, size, drop_path_rate=encoder.drop_path_rate, dynamic=False)
  if encoder.pos_embed == "sincos":
    grid = size // encoder.patch_size
    base.pos_embed.data.copy_(torch.from_numpy(pos_embed.sincos_pos_embed_2d(encoder.width, grid))[None])
    base.pos_embed.requires_grad_(False)
  if mocov3.PATCH_EMBED_PATTERN in config.optimizer.get("frozen", ()):
    base.patch_embed.requires_grad_(False)  # stop-grad-conv1
  projector = _mocov3_mlp(mc.projector, encoder.width)
  online = torch.nn.Sequential(base, projector, _mocov3_mlp(mc.predictor, mc.projector.out_dim))
  target = torch.nn.Sequential(copy.deepcopy(base), copy.deepcopy(projector))
  _frozen(target)
  online_params = [*base.parameters(), *projector.parameters()]
  target_params = list(target.parameters())
  device = views[0].device
  online.to(device).train()
  target.to(device).train()
  optimizer = _adamw(config, [{"params": [p for p in online.parameters() if p.requires_grad],
                               "weight_decay": config.optimizer.weight_decay}])
  online_net, target_net = compile_fn(online), compile_fn(target)
  temperature = float(mc.temperature)

  def run_step():
    with autocast():
      queries = [online_net(v).float() for v in views]
      with torch.no_grad():
        keys = [target_net(v).float() for v in views]
    loss = mocov3_loss(queries[0], keys[1], temperature) + mocov3_loss(queries[1], keys[0], temperature)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _ema(target_params, online_params, mc.momentum)
    return loss

  return run_step


def bench_torch(config, crops: list[np.ndarray], options: Options) -> dict:
  """The peer's step (`torch_dino_step` or `torch_mocov3_step`) on the same pixels, NCHW."""
  import torch  # pylint: disable=g-import-not-at-top  (the peer is optional)

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  tensors = [torch.from_numpy(crop.transpose(0, 3, 1, 2).copy()).to(device) for crop in crops]
  autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16,
                               enabled=config.model.dtype == "bfloat16")
  compile_fn = torch.compile if options.peer_compile else (lambda module: module)
  make_step = torch_dino_step if options.method == "dino" else torch_mocov3_step
  step = make_step(config, tensors, autocast, compile_fn)
  loss = None

  def run_step():
    nonlocal loss
    loss = step()

  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  run_step()  # stands in for JAX's separate compilation (and torch.compile's)
  seconds = median_step_seconds(run_step, sync, warmup=options.warmup, steps=options.steps)
  return dict(seconds_per_step=seconds, loss=loss.item(), torch=torch.__version__,
              timm=sys.modules["timm"].__version__, compiled=options.peer_compile,
              device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def run(options: Options) -> dict:
  """Times sslx (and the peer unless ``options.peer == 'none'``), prints a table, returns the record (also
  appended to ``options.json_out`` as one JSON line)."""
  config = build_config(options)
  crops = synthetic_crops(config)
  sizes = dino.crop_sizes(config)
  print(f"{options.method} {config.model.variant} depth {models.encoder_from_config(config.model).depth} | "
        f"batch {options.batch_size} | crops {sizes} | {config.model.dtype} | {jax.default_backend()} | "
        f"median of {options.steps} steps", flush=True)
  results = {"sslx": bench_sslx(config, crops, options)}
  print(f"sslx compiled in {results['sslx']['compile_s']:.1f}s", flush=True)
  if options.peer == "torch":
    results["torch"] = bench_torch(config, crops, options)
  print("\n| implementation | device | ms/step | images/s | loss |\n|---|---|---|---|---|")
  for name, result in results.items():
    result["ms_per_step"] = 1e3 * result["seconds_per_step"]
    result["images_per_s"] = options.batch_size / result["seconds_per_step"]
    print(f"| {name} | {result['device']} | {result['ms_per_step']:.1f} | {result['images_per_s']:.2f} | "
          f"{result['loss']:.4f} |")
  ratio = results["sslx"]["images_per_s"] / results["torch"]["images_per_s"] if "torch" in results else None
  if ratio is not None:
    print(f"\nsslx / torch throughput: {ratio:.2f}x")
  record = {**dataclasses.asdict(options),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "variant": config.model.variant, "depth": models.encoder_from_config(config.model).depth,
            "crops": sizes, "dtype": config.model.dtype, "jax": jax.__version__, "sslx_over_torch": ratio, **results}
  if options.json_out:
    with open(options.json_out, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
  return record


def _define_flags() -> None:
  """The command line, one flag per `Options` field (only when run as a script, so tests import this module
  without defining flags)."""
  flags.DEFINE_enum("method", "dino", list(RECIPES), "dino: DINO ViT-S/16; mocov3: MoCo v3 ViT-B/16.")
  flags.DEFINE_integer("batch_size", 16, "Images per step (each in all its crops).", lower_bound=2)
  flags.DEFINE_integer("steps", 5, "Timed steps; the median is reported.", lower_bound=1)
  flags.DEFINE_integer("warmup", 1, "Untimed steps before timing (after compilation).", lower_bound=0)
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                    "Compute dtype of both sides; auto: bfloat16 on an accelerator, float32 on a CPU.")
  flags.DEFINE_enum("peer", "torch", ["torch", "none"], "none: time sslx only (no torch, timm or lightly).")
  flags.DEFINE_bool("peer_compile", False, "Wrap the peer's networks in torch.compile.")
  flags.DEFINE_bool("local", False, "The configs' :local variants (tiny ViT and head, 32/16 px crops).")
  flags.DEFINE_integer("depth", None, "Transformer blocks (default: the recipe's).", lower_bound=1)
  flags.DEFINE_integer("image_size", None, "Global crop side (default: the recipe's).", lower_bound=1)
  flags.DEFINE_integer("local_size", None, "DINO's local crop side (default: the recipe's).", lower_bound=1)
  flags.DEFINE_integer("local_crops", None, "DINO's local crops (default: the recipe's).", lower_bound=0)
  flags.DEFINE_string("json_out", None, "Append the run's record as one JSON line to this file.")


def main(argv):
  del argv
  run(Options(**{field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(Options)}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
