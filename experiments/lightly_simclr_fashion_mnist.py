r"""lightly's SimCLR on Fashion-MNIST in PyTorch: the peer of sslx's `configs/simclr_fashion_mnist.py` run.

The model is a ResNet-18 (basic blocks, stages 2-2-2-2) at half width (32-64-128-256, 256 features) with
the small-image stem (3x3 stride-1 conv, no max-pool, one grey input channel), lightly's
``SimCLRProjectionHead`` (256-256-128) and ``NTXentLoss`` (T = 0.5), trained by SGD (lr 0.06 x batch / 256,
momentum 0.9, weight decay 5e-4: lightly's SimCLR example) on a cosine schedule over the run. Both views
of each image come from a random resized crop to 28 px (bilinear), a horizontal flip and brightness and
contrast jitter (0.4 each, p 0.8), drawn independently per image and view and applied to the whole batch
in the training loop, as sslx's on-device augmentation is: no data-loader workers compete with the step.
Images/s counts images, ``batch_size`` per step (each seen in two views), as sslx counts them; the first
step (allocator and kernel warm-up) is left out of every rate.

  python experiments/lightly_simclr_fashion_mnist.py --batch_size=16 --max_steps=3 --log_every=1   # check
  python experiments/lightly_simclr_fashion_mnist.py --json_out=peer.jsonl                          # 1 epoch
  python experiments/lightly_simclr_fashion_mnist.py --epochs=2 --knn --json_out=peer.jsonl          # quality

Where the recipe differs from sslx's: lightly's crop scale (0.08, 1) against sslx's (0.2, 1)
(``--crop_min_scale=0.2`` matches it), lightly's 2-layer head (its default) against sslx's 3-layer SimCLR
v2 head, T = 0.5 against 0.2, SGD against LARS, and the kNN temperature (0.1 here, InstDisc's; 0.07 in
``experiments/quality_fashion_mnist.py``). Like sslx, both views go through the network as one batch of
2N, so BatchNorm normalises over both.

lightly is imported as in ``tests/lightly_peer.py`` (installed with ``--no-deps``, without torchvision).
"""
import datetime
import gzip
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

_DATA_DIR = flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist",
                                "Directory of Fashion-MNIST's gzipped IDX files.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per step (each in two views).", lower_bound=2)
_EPOCHS = flags.DEFINE_float("epochs", 1.0, "Epochs to train (rounded to whole steps).", lower_bound=0.0)
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Steps to train instead of --epochs.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "Steps between progress lines.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, the data order and the augmentations.")
_WIDTH = flags.DEFINE_integer("width", 32, "Channels of the first ResNet stage (64 is the full ResNet-18).",
                              lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.5, "NT-Xent temperature.")
_CROP_MIN_SCALE = flags.DEFINE_float("crop_min_scale", 0.08, "Smallest area fraction of the random crop.")
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", False,
                                   "torch.channels_last memory format (lightly's peer runs NCHW).")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads.", lower_bound=1)
_KNN = flags.DEFINE_bool("knn", False, "After training, weighted kNN top-1 of the encoder's features.")
_KNN_EXAMPLES = flags.DEFINE_integer("knn_examples", None,
                                     "Use only the first N train and test images for the kNN (all: None).",
                                     lower_bound=1)
_KNN_K = flags.DEFINE_integer("knn_k", 20, "Neighbours of the kNN.", lower_bound=1)
_KNN_TEMPERATURE = flags.DEFINE_float("knn_temperature", 0.1, "Temperature of the kNN vote weights.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append the results as one JSON line to this file.")

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training pixels, in [0, 1]
SIZE = 28
CLASSES = 10
EVAL_BATCH = 500  # images per forward pass of the kNN's embedding


def load_lightly():
  """``(SimCLRProjectionHead, NTXentLoss, lightly version)``, loaded without torchvision.

  ``tests/lightly_peer.py`` loads the loss; the head module sits under the same package ``__init__``s that
  import torchvision, so it is loaded behind the same stand-ins, which leave ``sys.modules`` afterwards.
  """
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  import lightly  # pylint: disable=g-import-not-at-top  (its own __init__ only sets the version)
  import lightly_peer  # pylint: disable=g-import-not-at-top

  loss_class = lightly_peer.ntxent_loss_class()
  heads = sys.modules.get("lightly.models.modules.heads")
  if heads is None:
    modules = lightly_peer._stand_ins(os.path.dirname(lightly.__file__))  # pylint: disable=protected-access
    stand_ins = {name: module for name, module in modules.items() if name not in sys.modules}
    sys.modules.update(stand_ins)
    try:
      heads = importlib.import_module("lightly.models.modules.heads")
    finally:
      for name, module in stand_ins.items():
        if sys.modules.get(name) is module:
          del sys.modules[name]
  return heads.SimCLRProjectionHead, loss_class, lightly.__version__


def read_idx(path: str, header: int, magic: int) -> np.ndarray:
  """The uint8 payload of a gzipped IDX file after its ``header`` bytes, checking its magic number."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
  return np.frombuffer(data, np.uint8, offset=header)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
  """Images ``(N, 1, 28, 28)`` and labels ``(N,)`` of ``train`` or ``t10k``, both uint8."""
  images = read_idx(os.path.join(_DATA_DIR.value, f"{split}-images-idx3-ubyte.gz"), 16, 2051)
  labels = read_idx(os.path.join(_DATA_DIR.value, f"{split}-labels-idx1-ubyte.gz"), 8, 2049)
  return torch.from_numpy(images.reshape(-1, 1, SIZE, SIZE).copy()), torch.from_numpy(labels.copy())


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 conv + BatchNorm layers around an identity, or a strided 1x1 conv + BatchNorm shortcut."""

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv3x3(in_channels, width, stride), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
    self.shortcut = nn.Identity()
    if stride != 1 or in_channels != width:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(width))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)), inplace=True)
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class SmallResNet18(nn.Module):
  """ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool); returns pooled 8w features."""

  def __init__(self, width: int = 32, in_channels: int = 1):
    super().__init__()
    self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    blocks, channels = [], width
    for stage, stage_width in enumerate((width, 2 * width, 4 * width, 8 * width)):
      for i in range(2):
        blocks.append(BasicBlock(channels, stage_width, 2 if stage > 0 and i == 0 else 1))
        channels = stage_width
    self.blocks = nn.Sequential(*blocks)
    self.features = channels
    # torchvision's init, which lightly's examples train from, rather than torch's default conv init.
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
  """Pixels in [0, 1] to Fashion-MNIST's zero mean and unit variance."""
  return (images - MEAN) / STD


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
  return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def crop_flip_thetas(batch: int, generator: torch.Generator, min_scale: float) -> torch.Tensor:
  """Per image, the ``(2, 3)`` affine of ``affine_grid`` that samples a random resized crop, maybe mirrored.

  The box is drawn as torchvision's ``RandomResizedCrop`` draws it: up to 10 tries of an area fraction
  uniform in ``(min_scale, 1)`` and a log-uniform aspect ratio in (3/4, 4/3), rounded to whole pixels, the
  first that fits wins, else the whole image; the offset is uniform over whole pixels. All tries are drawn
  at once so the batch needs no Python loop. One difference from crop-then-resize: the bilinear taps of
  the outermost output pixels reach up to half a pixel past the box into the image, where torchvision
  repeats the box's edge.
  """
  tries = 10
  area = SIZE * SIZE * _uniform(generator, batch, tries, low=min_scale, high=1.0)
  ratio = torch.exp(_uniform(generator, batch, tries, low=math.log(3 / 4), high=math.log(4 / 3)))
  widths, heights = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
  fits = (widths >= 1) & (widths <= SIZE) & (heights >= 1) & (heights <= SIZE)
  first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
  fallback = torch.full((batch,), float(SIZE), device=generator.device)
  width = torch.where(fits.any(dim=1), widths.gather(1, first)[:, 0], fallback)
  height = torch.where(fits.any(dim=1), heights.gather(1, first)[:, 0], fallback)
  left = torch.floor(_uniform(generator, batch) * (SIZE - width + 1))
  top = torch.floor(_uniform(generator, batch) * (SIZE - height + 1))
  # affine_grid maps output coordinates in [-1, 1] (pixel edges: align_corners=False) into the input:
  # the crop's half-extent is its size over the image's, its centre (2 * offset + size) / 28 - 1.
  flip = torch.where(_uniform(generator, batch) < 0.5, -1.0, 1.0)
  thetas = torch.zeros(batch, 2, 3, device=generator.device)
  thetas[:, 0, 0] = flip * width / SIZE
  thetas[:, 0, 2] = (2 * left + width) / SIZE - 1
  thetas[:, 1, 1] = height / SIZE
  thetas[:, 1, 2] = (2 * top + height) / SIZE - 1
  return thetas


def jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.4,
           p: float = 0.8) -> torch.Tensor:
  """torchvision's ``RandomApply(ColorJitter(brightness, contrast), p)`` per image on a grey batch in [0, 1].

  Brightness scales the pixels, contrast blends them with the image's mean; each factor is uniform in
  ``1 +- strength``, the two run in a random order per image, each clamped to [0, 1] as torchvision does.
  Images left alone get factors 1, which change nothing: pixels are already in [0, 1].
  """
  batch = images.shape[0]
  applied = (_uniform(generator, batch) < p)[:, None, None, None]
  ones = torch.ones((), device=images.device)

  def factors():
    drawn = _uniform(generator, batch, low=max(0.0, 1 - strength), high=1 + strength)[:, None, None, None]
    return torch.where(applied, drawn, ones)

  brightness, contrast = factors(), factors()

  def adjust_brightness(x):
    return (brightness * x).clamp_(0, 1)

  def adjust_contrast(x):
    return (contrast * x + (1 - contrast) * x.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)

  brightness_first = (_uniform(generator, batch) < 0.5)[:, None, None, None]
  return torch.where(brightness_first, adjust_contrast(adjust_brightness(images)),
                     adjust_brightness(adjust_contrast(images)))


def augment(images: torch.Tensor, generator: torch.Generator, min_scale: float) -> torch.Tensor:
  """One random view of each uint8 image of ``(B, 1, 28, 28)``: crop, flip, jitter, normalise."""
  images = images.float().div_(255)
  grid = F.affine_grid(crop_flip_thetas(images.shape[0], generator, min_scale), list(images.shape),
                       align_corners=False)
  # Border padding: a sample within half a pixel of the image's edge reads the edge, not black.
  views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
  return normalize(jitter(views, generator))


def batches(images: torch.Tensor, batch_size: int, generator: torch.Generator):
  """Endless batches of ``images``, a fresh permutation per epoch, the incomplete last batch dropped."""
  steps_per_epoch = len(images) // batch_size
  while True:
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for i in range(steps_per_epoch):
      yield images[order[i * batch_size:(i + 1) * batch_size]]


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, memory_format) -> torch.Tensor:
  """L2-normalised features of uint8 ``images`` in eval mode, without augmentation."""
  encoder.eval()
  features = []
  for chunk in images.split(EVAL_BATCH):
    x = normalize(chunk.float().div_(255)).contiguous(memory_format=memory_format)
    features.append(F.normalize(encoder(x), dim=1))
  return torch.cat(features)


@torch.no_grad()
def knn_top1(train_features, train_labels, test_features, test_labels, k: int, temperature: float) -> float:
  """Weighted kNN top-1 in percent (InstDisc): the k most cosine-similar training images vote for their
  class with weight exp(similarity / temperature)."""
  correct = 0
  for features, labels in zip(test_features.split(256), test_labels.split(256), strict=True):
    similarity, neighbours = (features @ train_features.T).topk(min(k, len(train_features)), dim=1)
    votes = torch.zeros(len(features), CLASSES, device=features.device)
    votes.scatter_add_(1, train_labels[neighbours], torch.exp(similarity / temperature))
    correct += int((votes.argmax(dim=1) == labels).sum())
  return 100.0 * correct / len(test_labels)


def device_name(device: str) -> str:
  if device == "cuda":
    return torch.cuda.get_device_name()
  return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv):
  del argv
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(_THREADS.value)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(_SEED.value)
  projection_head, ntxent_loss, lightly_version = load_lightly()
  memory_format = torch.channels_last if _CHANNELS_LAST.value else torch.contiguous_format

  train_images, train_labels = load_split("train")
  batch_size = _BATCH_SIZE.value
  steps_per_epoch = len(train_images) // batch_size
  steps = _MAX_STEPS.value or max(1, round(_EPOCHS.value * steps_per_epoch))
  encoder = SmallResNet18(_WIDTH.value)
  head = projection_head(input_dim=encoder.features, hidden_dim=encoder.features, output_dim=128)
  model = nn.Sequential(encoder, head).to(device, memory_format=memory_format).train()
  criterion = ntxent_loss(temperature=_TEMPERATURE.value)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * batch_size / 256, momentum=0.9, weight_decay=5e-4)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
  data_generator = torch.Generator().manual_seed(_SEED.value)
  augment_generator = torch.Generator(device=device).manual_seed(_SEED.value + 1)
  data = batches(train_images.to(device), batch_size, data_generator)
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  print(f"lightly SimCLR | ResNet-18 width {_WIDTH.value} | batch {batch_size} (x2 views) | {steps} steps "
        f"({steps / steps_per_epoch:.2f} epochs) | {device_name(device)} | torch {torch.__version__} | "
        f"lightly {lightly_version}", flush=True)

  step_seconds, loss, lr = [], None, None
  window_start = 0  # index into step_seconds of the first step since the last progress line
  run_start = time.perf_counter()
  for step in range(1, steps + 1):
    start = time.perf_counter()
    images = next(data)
    views = torch.cat([augment(images, augment_generator, _CROP_MIN_SCALE.value) for _ in range(2)])
    z0, z1 = model(views.contiguous(memory_format=memory_format)).chunk(2)
    loss = criterion(z0, z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    lr = optimizer.param_groups[0]["lr"]  # this step's; the schedule below moves on to the next
    optimizer.step()
    schedule.step()
    sync()
    step_seconds.append(time.perf_counter() - start)
    if step % _LOG_EVERY.value == 0 or step == steps:
      # step_seconds[0] is the warm-up step, left out of every rate.
      window = step_seconds[max(window_start, 1):]
      rate = f"{batch_size * len(window) / sum(window):.1f} img/s" if window else "warm-up"
      print(f"step {step}/{steps} | epoch {step / steps_per_epoch:.2f} | loss {loss.item():.4f} | "
            f"lr {lr:.4f} | {1e3 * step_seconds[-1]:.0f} ms | {rate}", flush=True)
      window_start = len(step_seconds)
  train_seconds = time.perf_counter() - run_start

  timed = step_seconds[1:]
  median_s = statistics.median(timed) if timed else None
  overall = batch_size * len(timed) / sum(timed) if timed else None
  if timed:
    print(f"\n{len(timed)} timed steps (after 1 warm-up step of {step_seconds[0]:.2f} s): median "
          f"{1e3 * median_s:.0f} ms/step = {batch_size / median_s:.1f} img/s; overall {overall:.1f} img/s; "
          f"{train_seconds:.1f} s in all", flush=True)
  record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                implementation="lightly", device=device_name(device), torch=torch.__version__,
                lightly=lightly_version, batch_size=batch_size, steps=steps, width=_WIDTH.value,
                temperature=_TEMPERATURE.value, crop_min_scale=_CROP_MIN_SCALE.value,
                channels_last=_CHANNELS_LAST.value, threads=torch.get_num_threads(),
                median_step_s=median_s, median_images_per_s=batch_size / median_s if timed else None,
                overall_images_per_s=overall, warmup_step_s=step_seconds[0], train_seconds=train_seconds,
                final_loss=loss.item())

  if _KNN.value:
    limit = _KNN_EXAMPLES.value
    test_images, test_labels = load_split("t10k")
    start = time.perf_counter()
    train_features = embed(encoder, train_images[:limit].to(device), memory_format)
    test_features = embed(encoder, test_images[:limit].to(device), memory_format)
    top1 = knn_top1(train_features, train_labels[:limit].long().to(device), test_features,
                    test_labels[:limit].long().to(device), _KNN_K.value, _KNN_TEMPERATURE.value)
    print(f"kNN top-1 (k={_KNN_K.value}, T={_KNN_TEMPERATURE.value}, {len(train_features)} train / "
          f"{len(test_features)} test): {top1:.2f}% ({time.perf_counter() - start:.1f} s)", flush=True)
    record.update(knn_top1=top1, knn_k=_KNN_K.value, knn_temperature=_KNN_TEMPERATURE.value,
                  knn_train_examples=len(train_features), knn_test_examples=len(test_features))

  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
