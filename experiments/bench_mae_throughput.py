r"""MAE pretraining throughput: sslx against Hugging Face ``ViTMAEForPreTraining``, same device, same run.

Times the full training step (forward, backward, AdamW update) on one device with a fixed synthetic
batch of normalised 224x224x3 images, so only compute is measured (no input pipeline). sslx runs the
``configs/mae_vitb.py`` recipe through ``sslx.train.make_train_step``, jitted with a donated state; the
peer runs PyTorch eager (``--peer_compile`` for ``torch.compile``) with SDPA attention and bf16 autocast
when the JAX side computes in bf16. Model FLOPs utilisation (MFU) uses the analytic count of
`model_flops.mae_train_flops_per_image`.

  python experiments/bench_mae_throughput.py --batch_size=4 --steps=3 --warmup_steps=1   # CPU check
  python experiments/bench_mae_throughput.py --model=L/16 --json_out=bench.jsonl         # GPU
"""
import datetime
import json
import time

from absl import app
from absl import flags
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from sslx import optim
from sslx import recipes
from sslx import train
from sslx import xla_options
from sslx.methods import RunLength, build_method
from sslx.models import vit

from model_flops import mae_train_flops_per_image, peak_flops

_MODEL = flags.DEFINE_enum("model", "B/16", ["B/16", "L/16", "quickstart"],
                           "ViT variant of the MAE encoder; 'quickstart' is configs/mae_fashion_mnist.py's "
                           "model and recipe (28x28x1, patch 4, 4x192, decoder 128x2).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per step (default: 256 on GPU, 8 on CPU).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed training steps.", lower_bound=1)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype of both sides (default: bfloat16 on GPU, float32 on CPU).")
_PEER = flags.DEFINE_enum("peer", "hf", ["hf", "none"], "Peer implementation to time as well.")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", False, "Wrap the peer model in torch.compile.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "Peak dense TFLOP/s of the device for MFU (default: from the table).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line with every number to this file.")

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # sets the length of the recipe's learning-rate schedule


def _time_steps(run_step, sync, warmup_steps: int, steps: int) -> float:
  """Seconds per step of ``run_step`` over ``steps`` calls, after ``warmup_steps`` untimed ones."""
  for _ in range(warmup_steps):
    run_step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    run_step()
  sync()
  return (time.perf_counter() - start) / steps


def bench_sslx(config) -> dict:
  """Compiles and times sslx's jitted MAE train step; returns seconds per step and XLA's FLOP count."""
  steps_per_epoch, total_steps = train.schedule_length(config, IMAGENET_TRAIN_EXAMPLES)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  method = build_method(config, RunLength(steps_per_epoch, total_steps))
  size, channels = config.data.image_size, config.data.channels
  state = xla_options.jit(lambda rng: nn.unbox(train.init_train_state(method, tx, rng, (size, size, channels))))(
      jax.random.PRNGKey(config.seed))
  batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (config.batch_size, size, size, channels)),
           "label": jnp.zeros((config.batch_size,), jnp.int32)}
  start = time.perf_counter()
  compiled = xla_options.jit(train.make_train_step(method, tx, schedules), donate_argnums=(0,)).lower(
      state, batch).compile()
  compile_s = time.perf_counter() - start
  xla_flops = (compiled.cost_analysis() or {}).get("flops")
  metrics = {}

  def run_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)

  seconds = _time_steps(run_step, lambda: jax.block_until_ready(state), _WARMUP_STEPS.value, _STEPS.value)
  return dict(seconds_per_step=seconds, compile_s=compile_s, loss=float(metrics["loss"]),
              xla_flops_per_step=xla_flops, device=jax.devices()[0].device_kind)


def bench_hf(config) -> dict:
  """Times ``transformers.ViTMAEForPreTraining`` with ``torch.optim.AdamW``; returns seconds per step."""
  import torch  # pylint: disable=g-import-not-at-top  (the peer is optional)
  import transformers  # pylint: disable=g-import-not-at-top

  encoder, decoder, opt = vit.from_config(config.model), config.method.decoder, config.optimizer
  hf_config = transformers.ViTMAEConfig(
      hidden_size=encoder.width, num_hidden_layers=encoder.depth, num_attention_heads=encoder.num_heads,
      intermediate_size=encoder.mlp_dim, decoder_hidden_size=decoder.width,
      decoder_num_hidden_layers=decoder.depth, decoder_num_attention_heads=decoder.num_heads,
      decoder_intermediate_size=decoder.mlp_dim, image_size=config.data.image_size,
      patch_size=encoder.patch_size, num_channels=config.data.channels, mask_ratio=config.method.mask_ratio,
      norm_pix_loss=config.method.norm_pix_loss, layer_norm_eps=config.model.layer_norm_eps,
      attn_implementation="sdpa")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.ViTMAEForPreTraining(hf_config).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.base_lr * config.batch_size / opt.lr_batch_base,
                                betas=(opt.b1, opt.b2), weight_decay=opt.weight_decay)
  if _PEER_COMPILE.value:
    model = torch.compile(model)
  size, channels = config.data.image_size, config.data.channels
  pixels = torch.randn(config.batch_size, channels, size, size, device=device)
  use_bf16 = config.model.dtype == "bfloat16"
  loss = None

  def run_step():
    nonlocal loss
    with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
      loss = model(pixel_values=pixels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  # One extra untimed step stands in for the JAX side's separate compilation (and torch.compile's).
  seconds = _time_steps(run_step, sync, _WARMUP_STEPS.value + 1, _STEPS.value)
  device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return dict(seconds_per_step=seconds, loss=loss.item(), device=device_name, torch=torch.__version__,
              transformers=transformers.__version__)


def _summarise(result: dict, batch_size: int, flops_per_image: int, peak) -> dict:
  seconds = result["seconds_per_step"]
  achieved = flops_per_image * batch_size / seconds
  return dict(result, ms_per_step=1e3 * seconds, images_per_s=batch_size / seconds,
              model_tflops_per_s=achieved / 1e12, mfu=achieved / peak if peak else None)


def main(argv):
  del argv
  on_cpu = jax.default_backend() == "cpu"
  dtype = _DTYPE.value or ("float32" if on_cpu else "bfloat16")
  if _MODEL.value == "quickstart":
    config = recipes.mae_fashion_mnist()
    config.batch_size = _BATCH_SIZE.value or 256
  else:
    config = recipes.mae_imagenet(_MODEL.value, None)
    config.batch_size = _BATCH_SIZE.value or (8 if on_cpu else 256)
  config.model.dtype = dtype
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind, dtype, _PEAK_TFLOPS.value)
  flops_per_image = mae_train_flops_per_image(config)
  print(f"MAE {config.model.variant} | batch {config.batch_size} | {dtype} | {device_kind} | "
        f"{flops_per_image / 1e9:.1f} model GFLOP per image per training step", flush=True)

  results = {"sslx": _summarise(bench_sslx(config), config.batch_size, flops_per_image, peak)}
  print(f"sslx train step compiled in {results['sslx']['compile_s']:.1f}s", flush=True)
  xla_flops = results["sslx"]["xla_flops_per_step"]
  if xla_flops:
    print(f"XLA cost analysis: {xla_flops / config.batch_size / 1e9:.1f} GFLOP per image "
          f"({xla_flops / config.batch_size / flops_per_image:.2f} x the analytic count)", flush=True)
  if _PEER.value == "hf":
    results["hf"] = _summarise(bench_hf(config), config.batch_size, flops_per_image, peak)

  print("\n| implementation | model | batch | dtype | device | ms/step | images/s | MFU | loss |\n"
        "|---|---|---|---|---|---|---|---|---|")
  for name, result in results.items():
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    print(f"| {name} | {config.model.variant} | {config.batch_size} | {dtype} | {result['device']} | "
          f"{result['ms_per_step']:.1f} | {result['images_per_s']:.1f} | {mfu} | {result['loss']:.4f} |")
  if "hf" in results:
    ratio = results["sslx"]["images_per_s"] / results["hf"]["images_per_s"]
    results["sslx_over_hf"] = ratio
    print(f"\nsslx / hf throughput: {ratio:.2f}x")

  if _JSON_OUT.value:
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  model=config.model.variant, batch_size=config.batch_size, dtype=dtype,
                  steps=_STEPS.value, warmup_steps=_WARMUP_STEPS.value, device_kind=device_kind,
                  backend=jax.default_backend(), jax=jax.__version__, flax=flax.__version__,
                  model_flops_per_image=flops_per_image, peak_flops=peak, **results)
    with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
