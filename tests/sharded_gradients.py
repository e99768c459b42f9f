"""python tests/sharded_gradients.py OVERRIDES_JSON FSDP[,FSDP...]: the tiny MAE's loss and gradients for one
batch on one device, then on every (fake CPU) device with each FSDP width, must agree; prints "gradients match".

Run under ``--xla_force_host_platform_device_count=8`` (`multiprocess_helpers.cpu_env(8)`). OVERRIDES_JSON:
`train_helpers.tiny_run_config` overrides, e.g. '{"model.scan_blocks": true}'.
"""
import json
import sys

import flax.linen as nn
import jax
from jax.sharding import Mesh
import numpy as np

from sslx import methods
from sslx import parallel
from train_helpers import tiny_run_config


def loss_and_grads(method, boxed, images, rng, devices, fsdp):
  mesh = Mesh(np.array(devices).reshape(-1, fsdp), parallel.DATA_AXES)
  param_sharding = parallel.shardings_from_logical(boxed, mesh, parallel.logical_axis_rules(fsdp))
  params = jax.jit(lambda: nn.unbox(method.init(rng, {"image": images[:1]})[0]["params"]),
                   out_shardings=param_sharding)()
  batch = jax.device_put({"image": images}, parallel.batch_sharding(mesh))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: method.loss_fn({"params": p}, {}, b, rng)[0]))
  loss, grads = grad_fn(params, batch)
  return float(loss), jax.device_get(grads)


def main(overrides_json: str, fsdps: str) -> None:
  method = methods.build_method(tiny_run_config(**json.loads(overrides_json)))
  images = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
  rng = jax.random.PRNGKey(3)
  boxed = jax.eval_shape(lambda: method.init(rng, {"image": images[:1]})[0]["params"])
  loss1, grads1 = loss_and_grads(method, boxed, images, rng, jax.devices()[:1], 1)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
  for fsdp in map(int, fsdps.split(",")):
    loss8, grads8 = loss_and_grads(method, boxed, images, rng, jax.devices(), fsdp)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), grads8, grads1)
    print(f"fsdp={fsdp}: loss {loss8!r} vs {loss1!r}")
  print("gradients match")


if __name__ == "__main__":
  main(*sys.argv[1:])
