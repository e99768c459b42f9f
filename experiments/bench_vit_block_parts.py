r"""Where a ViT block's training time goes under XLA:CPU, part by part, beside PyTorch eager in the same run.

Times forward + backward (gradients of ``sum(out ** 2)`` with respect to every input and weight) of one
pre-norm block and of its parts, at one token shape, for sslx's modules (``sslx.models.vit.Block`` / ``Mlp``,
``sslx.models.attention.self_attention``) and for the formulations they replaced:

  mlp_3d_dot          the MLP with its matmuls over ``(B, T, D)`` tokens (sslx before 2026-12-01)
  attention_core_dpa  ``jax.nn.dot_product_attention(implementation='xla')`` on ``(B, T, N, H)``

and for the same computation in PyTorch (``F.linear``, ``F.gelu``, ``F.layer_norm``,
``F.scaled_dot_product_attention``). Rounds alternate between the variants, so a busy machine slows all of
them alike; each number is the median over rounds of the mean of ``--steps`` calls.

  python experiments/bench_vit_block_parts.py                                   # quick-start decoder
  python experiments/bench_vit_block_parts.py --batch=256 --tokens=13 --width=192 --heads=3   # its encoder
  python experiments/bench_vit_block_parts.py --batch=8 --tokens=197 --width=768 --heads=12   # B/16 encoder
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sslx.models import attention
from sslx.models import vit

_BATCH = flags.DEFINE_integer("batch", 256, "Images.")
_TOKENS = flags.DEFINE_integer("tokens", 50, "Tokens per image (the quick start's decoder: 49 patches + cls).")
_WIDTH = flags.DEFINE_integer("width", 128, "Token width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_MLP_RATIO = flags.DEFINE_integer("mlp_ratio", 4, "MLP hidden width / token width.")
_STEPS = flags.DEFINE_integer("steps", 5, "Calls per round.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; the median is reported.", lower_bound=1)
_THREADS = flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: torch's own).")


def _jax_case(function, *args):
  """A jitted ``grad(sum(function(*args) ** 2))`` over every argument, and its arguments."""
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(function(*a) ** 2), argnums=tuple(range(len(args)))))
  return lambda: jax.block_until_ready(grads(*args))


def _flax_case(module, x):
  params = module.init(jax.random.PRNGKey(0), x)
  return _jax_case(lambda p, x: module.apply(p, x), params, x)


def jax_cases(x, qkv):
  width, mlp_dim = x.shape[-1], _MLP_RATIO.value * x.shape[-1]
  rng = np.random.default_rng(1)
  w1 = jnp.asarray(rng.normal(size=(width, mlp_dim)) * width ** -0.5, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(mlp_dim, width)) * mlp_dim ** -0.5, jnp.float32)

  def mlp_3d_dot(w1, w2, x):
    return jnp.einsum("btf,fd->btd", jax.nn.gelu(jnp.einsum("btd,df->btf", x, w1), approximate=False), w2)

  def attention_core_dpa(qkv):
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="xla")

  return {
      "block": _flax_case(vit.Block(num_heads=_HEADS.value, mlp_dim=mlp_dim), x),
      "mlp": _flax_case(vit.Mlp(mlp_dim), x),
      "mlp_3d_dot": _jax_case(mlp_3d_dot, w1, w2, x),
      "attention_core": _jax_case(lambda qkv: attention.self_attention(qkv, "xla"), qkv),
      "attention_core_dpa": _jax_case(attention_core_dpa, qkv),
      "layer_norm": _flax_case(vit.layer_norm(1e-6, jnp.float32, jnp.float32, "norm"), x),
  }


def torch_cases(x, qkv):
  import torch  # pylint: disable=g-import-not-at-top  (the peer is optional)
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  batch, tokens, width = x.shape
  heads, mlp_dim = _HEADS.value, _MLP_RATIO.value * width

  def weight(*shape):
    return (torch.randn(*shape) * shape[-1] ** -0.5).requires_grad_()

  w = dict(qkv=weight(3 * width, width), proj=weight(width, width), fc1=weight(mlp_dim, width),
           fc2=weight(width, mlp_dim))
  b = {name: torch.zeros(value.shape[0], requires_grad=True) for name, value in w.items()}
  norms = [(torch.ones(width, requires_grad=True), torch.zeros(width, requires_grad=True)) for _ in range(2)]
  x = torch.tensor(np.asarray(x), requires_grad=True)
  qkv = torch.tensor(np.asarray(qkv), requires_grad=True)

  def attention_core(qkv):
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

  def mlp(y):
    return F.linear(F.gelu(F.linear(y, w["fc1"], b["fc1"])), w["fc2"], b["fc2"])

  def block(x):
    y = F.layer_norm(x, (width,), *norms[0], eps=1e-6)
    qkv = F.linear(y, w["qkv"], b["qkv"]).reshape(batch, tokens, 3, heads, width // heads)
    x = x + F.linear(attention_core(qkv).reshape(batch, tokens, width), w["proj"], b["proj"])
    return x + mlp(F.layer_norm(x, (width,), *norms[1], eps=1e-6))

  def case(function, argument):
    def run():
      (function(argument) ** 2).sum().backward()
    return run

  return {"block": case(block, x), "mlp": case(mlp, x), "attention_core": case(attention_core, qkv),
          "layer_norm": case(lambda x: F.layer_norm(x, (width,), *norms[0], eps=1e-6), x)}


def main(argv):
  del argv
  batch, tokens, width, heads = _BATCH.value, _TOKENS.value, _WIDTH.value, _HEADS.value
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, tokens, width)), jnp.float32)
  qkv = jnp.asarray(rng.normal(size=(batch, tokens, 3, heads, width // heads)), jnp.float32)
  cases = {("sslx", name): run for name, run in jax_cases(x, qkv).items()}
  cases.update({("torch", name): run for name, run in torch_cases(x, qkv).items()})
  for run in cases.values():  # compile, and a first untimed call
    run()
  times = {key: [] for key in cases}
  for _ in range(_ROUNDS.value):
    for key, run in cases.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        run()
      times[key].append(1e3 * (time.perf_counter() - start) / _STEPS.value)
  print(f"forward + backward, ms: batch {batch}, {tokens} tokens, width {width}, {heads} heads, "
        f"MLP {_MLP_RATIO.value * width}; {jax.devices()[0].device_kind}")
  print("\n| part | sslx | torch | sslx / torch time |\n|---|---|---|---|")
  for name in ("block", "mlp", "mlp_3d_dot", "attention_core", "attention_core_dpa", "layer_norm"):
    ours = statistics.median(times["sslx", name])
    peer_key = ("torch", name.replace("_3d_dot", "").replace("_dpa", ""))
    peer = statistics.median(times[peer_key])
    print(f"| {name} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} |")


if __name__ == "__main__":
  app.run(main)
