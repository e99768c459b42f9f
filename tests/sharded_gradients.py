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


def as_batch(images) -> dict:
  """``images`` (B, H, W, C) as the batch ``{'image': images}``; a dict (e.g. video ``{'frames': ...}``) as
  it is."""
  return dict(images) if isinstance(images, dict) else {"image": images}


def loss_and_grads(method, images, rng, devices, fsdp, example=None):
  """One training pass of ``method`` over ``images`` (an array of images, or a batch dict whose arrays all
  lead with the batch axis) split over ``devices`` (FSDP width ``fsdp``), its variables and method state
  initialised from ``rng`` on ``example`` (default: the first image) and sharded as a run shards them.
  Returns the loss, the parameters' gradients and the model state the pass updated (BatchNorm statistics, a
  VQ codebook; ``{}`` if none), as numpy."""
  batch = as_batch(images)
  example = {"image": batch["image"][:1]} if example is None else example
  init = lambda: method.init(rng, example)
  mesh = Mesh(np.array(devices).reshape(-1, fsdp), parallel.DATA_AXES)
  shardings = parallel.shardings_from_logical(jax.eval_shape(init), mesh, parallel.logical_axis_rules(fsdp))
  variables, method_state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
  rest = {name: value for name, value in variables.items() if name != "params"}
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))

  def objective(params, rest, method_state, batch):
    loss, (_, _, model_state) = method.loss_fn({**rest, "params": params}, method_state, batch, rng)
    return loss, model_state

  (loss, model_state), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      variables["params"], rest, method_state, batch)
  return float(loss), jax.device_get(grads), jax.device_get(model_state)


def assert_devices_agree(method, images, rng, fsdps, example=None, grad_atol=1e-6):
  """`loss_and_grads` on one device, then on every device with each FSDP width in ``fsdps``: the same loss,
  gradients and model state up to float32 reduction order; prints "gradients match". Gradients may differ by
  ``grad_atol`` times the largest one (plus 1e-5 of their own size)."""
  loss1, grads1, state1 = loss_and_grads(method, images, rng, jax.devices()[:1], 1, example)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
  for fsdp in fsdps:
    loss8, grads8, state8 = loss_and_grads(method, images, rng, jax.devices(), fsdp, example)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=grad_atol * scale), grads8,
                 grads1)
    assert_state = lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                                                 err_msg=jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(assert_state, state8, state1)
    print(f"fsdp={fsdp}: loss {loss8!r} vs {loss1!r}")
  print("gradients match")
  return loss1, grads1, state1


def main(overrides_json: str, fsdps: str) -> None:
  method = methods.build_method(tiny_run_config(**json.loads(overrides_json)))
  images = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
  assert_devices_agree(method, images, jax.random.PRNGKey(3), map(int, fsdps.split(",")))


if __name__ == "__main__":
  main(*sys.argv[1:])
