"""InfoNCE and NT-Xent against numpy, against the PyTorch peer lightly, and on 1 vs 8 devices."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import losses
from multiprocess_helpers import REPO, cpu_env

TEMPERATURES = (0.07, 0.1, 0.5, 1.0)


@pytest.fixture(scope="module")
def views():
  """Queries, keys correlated with them (so top-1 accuracy is neither 0 nor 1) and a queue of negatives."""
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(6, 5)).astype(np.float32)
  keys = (queries + rng.normal(size=queries.shape)).astype(np.float32)
  negatives = rng.normal(size=(4, 5)).astype(np.float32)
  return queries, keys, negatives


def _unit_rows(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_info_nce_terms(anchors, candidates, negatives, temperature, batch_negatives=True):
  """Per-anchor ``-log softmax`` of the positive (candidate i) and whether it has the largest logit; without
  batch negatives anchor i's candidates are candidate i and the negatives."""
  anchors, candidates = _unit_rows(anchors), _unit_rows(candidates)
  negatives = _unit_rows(negatives) if negatives is not None else np.zeros((0, anchors.shape[1]))
  terms, hits = [], []
  for i, anchor in enumerate(anchors):
    others = candidates if batch_negatives else candidates[i:i + 1]
    positive = i if batch_negatives else 0
    logits = [anchor @ other / temperature for other in [*others, *negatives]]
    terms.append(-np.log(np.exp(logits[positive]) / np.sum(np.exp(logits))))
    hits.append(float(np.argmax(logits) == positive))
  return np.array(terms), np.array(hits)


def _reference_info_nce(queries, keys, negatives, temperature, symmetric, batch_negatives=True):
  terms, hits = _reference_info_nce_terms(queries, keys, negatives, temperature, batch_negatives)
  if symmetric:
    swapped_terms, swapped_hits = _reference_info_nce_terms(keys, queries, negatives, temperature,
                                                            batch_negatives)
    terms, hits = (terms + swapped_terms) / 2, (hits + swapped_hits) / 2
  return terms, hits.mean()


def _reference_nt_xent(z1, z2, temperature):
  views = _unit_rows(np.concatenate([z1, z2]))
  images = len(z1)
  terms, hits = [], []
  for a, anchor in enumerate(views):
    positive = (a + images) % (2 * images)
    others = [b for b in range(2 * images) if b != a]
    logits = {b: anchor @ views[b] / temperature for b in others}
    terms.append(-np.log(np.exp(logits[positive]) / sum(np.exp(logits[b]) for b in others)))
    hits.append(float(max(logits, key=logits.get) == positive))
  terms = np.array(terms)
  return (terms[:images] + terms[images:]) / 2, np.mean(hits)


def _assert_matches(result, per_example, accuracy):
  assert result.loss.shape == () and result.loss.dtype == jnp.float32
  assert result.per_example.shape == per_example.shape and result.per_example.dtype == jnp.float32
  np.testing.assert_allclose(result.per_example, per_example, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.loss, per_example.mean(), rtol=1e-5)
  np.testing.assert_allclose(result.accuracy, accuracy, rtol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_matches_numpy(views, temperature, symmetric, with_queue):
  queries, keys, queue = views
  negatives = queue if with_queue else None
  result = losses.info_nce(queries, keys, temperature=temperature, negatives=negatives, symmetric=symmetric)
  _assert_matches(result, *_reference_info_nce(queries, keys, negatives, temperature, symmetric))
  assert 0 < float(result.accuracy) < 1  # the data can tell a wrong positive column from a right one


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_against_the_queue_only_matches_numpy(views, temperature, symmetric):
  queries, keys, queue = views
  result = losses.info_nce(queries, keys, temperature=temperature, negatives=queue, symmetric=symmetric,
                           batch_negatives=False)
  _assert_matches(result, *_reference_info_nce(queries, keys, queue, temperature, symmetric, False))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_nt_xent_matches_numpy(views, temperature):
  z1, z2, _ = views
  result = losses.nt_xent(z1, z2, temperature=temperature)
  _assert_matches(result, *_reference_nt_xent(z1, z2, temperature))
  assert 0 < float(result.accuracy) < 1


def test_traced_temperature_and_low_precision_inputs(views):
  queries, keys, queue = views
  loss = jax.jit(lambda t: losses.info_nce(queries, keys, temperature=t, negatives=queue).loss)(0.1)
  np.testing.assert_allclose(loss, losses.info_nce(queries, keys, temperature=0.1, negatives=queue).loss,
                             rtol=1e-6)
  low = jnp.asarray(queries, jnp.bfloat16), jnp.asarray(keys, jnp.bfloat16)
  assert losses.nt_xent(*low, temperature=0.1).loss.dtype == jnp.float32
  assert losses.info_nce(*low, temperature=0.1).per_example.dtype == jnp.float32


def _torch_loss_and_grads(loss_module, out0, out1):
  import torch  # pylint: disable=g-import-not-at-top
  out0, out1 = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (out0, out1))
  loss = loss_module(out0, out1)
  loss.backward()
  return loss.item(), out0.grad.numpy(), out1.grad.numpy()


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_nt_xent_matches_lightly(views, temperature):
  from lightly_peer import ntxent_loss_class  # pylint: disable=g-import-not-at-top
  z1, z2, _ = views
  expected, *expected_grads = _torch_loss_and_grads(ntxent_loss_class()(temperature=temperature), z1, z2)
  loss, grads = jax.value_and_grad(lambda a, b: losses.nt_xent(a, b, temperature=temperature).loss,
                                   argnums=(0, 1))(z1, z2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_info_nce_with_a_queue_matches_lightly_memory_bank(views, temperature):
  """lightly's NTXentLoss(memory_bank_size=(K, D))(out0, out1): out0 is the anchor, out1 its positive (and
  what the bank stores, after the loss), and the negatives are the bank only, NOT the other rows of out1
  (the MoCo v1/v2 form): info_nce(queries=out0, keys=out1, negatives=bank, batch_negatives=False). With the
  batch's other keys as well (the default), one pair at a time (a batch of one has no other keys) agrees."""
  import torch  # pylint: disable=g-import-not-at-top
  from lightly_peer import ntxent_loss_class  # pylint: disable=g-import-not-at-top
  queries, keys, queue = views
  bank = _unit_rows(queue)  # what lightly's bank holds: normalised rows (it normalises before storing)
  peer = ntxent_loss_class()(temperature=temperature, memory_bank_size=queue.shape)
  peer.memory_bank.bank = torch.tensor(bank)  # (K, D), read before this call's outputs are pushed
  expected, *expected_grads = _torch_loss_and_grads(peer, queries, keys)
  loss, grads = jax.value_and_grad(
      lambda q, k: losses.info_nce(q, k, temperature=temperature, negatives=queue, batch_negatives=False).loss,
      argnums=(0, 1))(queries, keys)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
  per_pair = [losses.info_nce(queries[i:i + 1], keys[i:i + 1], temperature=temperature, negatives=queue).loss
              for i in range(len(queries))]
  np.testing.assert_allclose(np.mean(per_pair), expected, rtol=1e-5)


def test_no_gradient_flows_into_negatives(views):
  queries, keys, queue = views
  grads = jax.grad(lambda q, n: losses.info_nce(q, keys, temperature=0.1, negatives=n, symmetric=True).loss,
                   argnums=(0, 1))(queries, queue)
  assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).max() > 0
  np.testing.assert_array_equal(grads[1], np.zeros_like(queue))


@pytest.mark.parametrize("call, argument", [
    (lambda q, k, n: losses.info_nce(q, k[:-1], temperature=0.1), "keys"),
    (lambda q, k, n: losses.info_nce(q[0], k[0], temperature=0.1), "queries"),
    (lambda q, k, n: losses.info_nce(q, k, temperature=0.1, negatives=n[:, :-1]), "negatives"),
    (lambda q, k, n: losses.info_nce(q, k, temperature=0.0), "temperature"),
    (lambda q, k, n: losses.info_nce(q, k, temperature=0.1, batch_negatives=False), "negatives"),
    (lambda q, k, n: losses.nt_xent(q, k[:, :-1], temperature=0.1), "z2"),
    (lambda q, k, n: losses.nt_xent(q, k, temperature=-0.5), "temperature"),
])
def test_bad_inputs_raise_naming_the_argument(views, call, argument):
  with pytest.raises(ValueError, match=argument):
    call(*views)


# One subprocess with 8 fake CPU devices: every loss, value and gradients, on 1 device and on meshes 8x1
# (found through jax.set_mesh) and 4x2 (passed as mesh=), and proof that the sharded path ran.
_EIGHT_DEVICES_SCRIPT = """
import jax, numpy as np
from sslx import losses, parallel

rng = np.random.default_rng(1)
B, D, K = 16, 8, 5
queries = rng.normal(size=(B, D)).astype(np.float32)
keys = (queries + 0.8 * rng.normal(size=(B, D))).astype(np.float32)
queue = rng.normal(size=(K, D)).astype(np.float32)
CASES = {  # name: (loss, one device's logits (local x global), the whole logits (global x global))
    "info_nce": (lambda a, b, n, mesh: losses.info_nce(a, b, temperature=0.1, mesh=mesh), (2, 16), (16, 16)),
    "info_nce_queue": (lambda a, b, n, mesh: losses.info_nce(a, b, temperature=0.1, negatives=n, mesh=mesh),
                       (2, K), (16, K)),
    "info_nce_symmetric": (lambda a, b, n, mesh: losses.info_nce(
        a, b, temperature=0.2, negatives=n, symmetric=True, mesh=mesh), (2, 16), (16, 16)),
    "info_nce_queue_only": (lambda a, b, n, mesh: losses.info_nce(
        a, b, temperature=0.2, negatives=n, batch_negatives=False, symmetric=True, mesh=mesh), (2, K), (16, K)),
    "nt_xent": (lambda a, b, n, mesh: losses.nt_xent(a, b, temperature=0.5, mesh=mesh), (4, 32), (32, 32)),
}

# (output shape, inside a shard_map i.e. per device) of every matrix product in jaxpr and those it calls.
def products(jaxpr, inside_shard_map=False, found=None):
  found = set() if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.add((tuple(eqn.outvars[0].aval.shape), inside_shard_map))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        products(inner, inside_shard_map or eqn.primitive.name == "shard_map", found)
  return found

def value_and_grads(loss, mesh_shape, explicit):
  mesh = None
  args = (queries, keys, queue)
  if mesh_shape is not None:
    mesh = jax.make_mesh(mesh_shape, parallel.DATA_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    args = jax.device_put(args, (parallel.batch_sharding(mesh),) * 2 + (parallel.replicated(mesh),))
  def objective(a, b, n):
    result = loss(a, b, n, mesh if explicit else None)
    return result.loss, result
  fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
  if mesh is None or explicit:
    return fn(*args), fn, args
  with jax.set_mesh(mesh):
    return fn(*args), fn, args

for name, (loss, local_logits, global_logits) in CASES.items():
  ((value1, result1), grads1), _, _ = value_and_grads(loss, None, False)
  scale = max(float(np.abs(g).max()) for g in grads1[:2])
  for mesh_shape, explicit in (((8, 1), False), ((4, 2), True)):
    ((value8, result8), grads8), fn, args = value_and_grads(loss, mesh_shape, explicit)
    np.testing.assert_allclose(value8, value1, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(result8.per_example, result1.per_example, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(result8.accuracy, result1.accuracy, rtol=1e-6, err_msg=name)
    for g8, g1 in zip(grads8[:2], grads1[:2]):
      np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
    np.testing.assert_array_equal(grads8[2], 0.0)
    mesh = jax.make_mesh(mesh_shape, parallel.DATA_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
      shapes = products(jax.make_jaxpr(fn)(*args).jaxpr)
      hlo = fn.lower(*args).as_text()
    assert (local_logits, True) in shapes, (name, shapes)
    assert not {(global_logits, True), (global_logits, False)} & shapes, (name, shapes)
    # The keys' (and views') gradient comes back through all-gather's transpose, summed over the devices;
    # against the queue alone each device needs only its own rows.
    gathers = name != "info_nce_queue_only"
    assert ("all_gather" in hlo and "reduce_scatter" in hlo) == gathers, name
  print(name, "matches")

mesh = jax.make_mesh((8, 1), parallel.DATA_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
try:
  losses.info_nce(queries[:12], keys[:12], temperature=0.1, mesh=mesh)
except ValueError as error:
  assert "queries" in str(error) and "(12, 8)" in str(error) and "8 devices" in str(error), error
else:
  raise AssertionError("12 rows on 8 devices did not raise")
print("all match")
"""


def test_eight_devices_give_the_same_losses_and_gradients():
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES_SCRIPT], env=cpu_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "all match" in result.stdout
