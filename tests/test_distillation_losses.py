"""BYOL's regression, DINO's self-distillation (loss, centre, teacher temperature) and MoCo v3's InfoNCE against
numpy, against the PyTorch peer lightly, and on 1 vs 8 devices."""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import losses
from multiprocess_helpers import REPO, cpu_env

# (student, teacher) temperatures: DINO's 0.1 with its warm-up's two ends, and two mild ones.
DINO_TEMPERATURES = ((0.1, 0.04), (0.1, 0.07), (0.5, 0.2), (1.0, 1.0))
MOCO_TEMPERATURES = (0.1, 0.2, 1.0)
GLOBAL_CROPS, LOCAL_CROPS, IMAGES, CLASSES = 2, 4, 8, 32


@pytest.fixture(scope="module")
def byol_pair():
  """Predictions and targets correlated with them, so cosines spread over (-1, 1) rather than sit near 0."""
  rng = np.random.default_rng(0)
  predictions = rng.normal(size=(12, 16)).astype(np.float32)
  targets = (predictions + 1.5 * rng.normal(size=predictions.shape)).astype(np.float32)
  return predictions, targets


@pytest.fixture(scope="module")
def dino_logits():
  """Student logits for 2 global + 4 local crops, teacher logits for the global crops (related to the
  student's, as a teacher's are) and a centre, all of an order that makes tau_t = 0.04 sharpen hard."""
  rng = np.random.default_rng(1)
  student = rng.normal(size=(GLOBAL_CROPS + LOCAL_CROPS, IMAGES, CLASSES)).astype(np.float32)
  teacher = (student[:GLOBAL_CROPS] + 0.5 * rng.normal(size=(GLOBAL_CROPS, IMAGES, CLASSES))).astype(np.float32)
  center = (0.3 * rng.normal(size=CLASSES)).astype(np.float32)
  return student, teacher, center


@pytest.fixture(scope="module")
def mocov3_views():
  """Queries of both views and momentum keys of both views; each query's positive is the key of the image's
  other view, so k2 is correlated with q1 and k1 with q2."""
  rng = np.random.default_rng(2)
  q1, q2 = rng.normal(size=(2, 10, 6)).astype(np.float32)
  k2, k1 = (q1 + rng.normal(size=q1.shape)).astype(np.float32), (q2 + rng.normal(size=q2.shape)).astype(np.float32)
  return q1, q2, k1, k2


def _unit_rows(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _with_result(loss_fn):
  """``loss_fn``'s ``.loss``, with its whole result as the aux of ``jax.value_and_grad(..., has_aux=True)``."""
  def objective(*args):
    result = loss_fn(*args)
    return result.loss, result
  return objective


def _torch(*arrays):
  import torch  # pylint: disable=g-import-not-at-top
  return [torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in arrays]


# --- BYOL ---------------------------------------------------------------------------------------------------

def _reference_byol(predictions, targets):
  """Per-row ``2 - 2 cos(p, t)`` and the gradient of its mean wrt p: ``-(2 / B |p|) (t^ - (p^.t^) p^)``."""
  p, t = _unit_rows(predictions), _unit_rows(targets)
  cosines = np.sum(p * t, axis=1)
  norms = np.linalg.norm(np.asarray(predictions, np.float64), axis=1, keepdims=True)
  grad = -2 / (len(p) * norms) * (t - cosines[:, None] * p)
  return 2 - 2 * cosines, grad


def test_byol_loss_matches_numpy(byol_pair):
  predictions, targets = byol_pair
  per_example, expected_grad = _reference_byol(predictions, targets)
  (loss, result), grad = jax.value_and_grad(_with_result(lambda p: losses.byol_loss(p, targets)),
                                            has_aux=True)(predictions)
  assert result.per_example.shape == (12,) and result.per_example.dtype == jnp.float32
  np.testing.assert_allclose(result.per_example, per_example, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  assert per_example.min() < 1 < per_example.max()  # both signs of cosine: a wrong sign would show


def test_byol_loss_is_two_plus_twice_lightlys_negative_cosine_similarity(byol_pair):
  """lightly's NegativeCosineSimilarity()(p, t) = -mean_i cos(p_i, t_i), so BYOL's mean of 2 - 2 cos is
  2 + 2 * it, and its gradient wrt the predictions twice lightly's."""
  from lightly_peer import negative_cosine_similarity_class  # pylint: disable=g-import-not-at-top
  predictions, targets = byol_pair
  p, t = _torch(predictions, targets)
  negative_cosine = negative_cosine_similarity_class()()(p, t)
  negative_cosine.backward()
  loss, grad = jax.value_and_grad(lambda p: losses.byol_loss(p, targets).loss)(predictions)
  np.testing.assert_allclose(loss, 2 + 2 * negative_cosine.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, 2 * p.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_byol_targets_get_no_gradient_and_low_precision_computes_in_float32(byol_pair):
  predictions, targets = byol_pair
  grad = jax.grad(lambda t: losses.byol_loss(predictions, t).loss)(targets)
  np.testing.assert_array_equal(grad, np.zeros_like(targets))
  low = losses.byol_loss(jnp.asarray(predictions, jnp.bfloat16), jnp.asarray(targets, jnp.bfloat16))
  assert low.loss.dtype == low.per_example.dtype == jnp.float32


# --- DINO ---------------------------------------------------------------------------------------------------

def _reference_dino(student, teacher, center, student_temperature, teacher_temperature):
  """facebookresearch/dino's loop over (teacher crop a, student crop v != a), each term a batch mean; the
  teacher's mean entropy; the mean KL over the same pairs; the loss's gradient wrt the student logits,
  ``(1 / (pairs B tau_s)) sum_{a != v} (softmax(s_v / tau_s) - P_t[a])``."""
  student, teacher, center = (np.asarray(x, np.float64) for x in (student, teacher, center))
  teacher_probs = _softmax((teacher - center.reshape(-1)) / teacher_temperature)
  student_probs = _softmax(student / student_temperature)
  pairs = [(a, v) for a in range(len(teacher)) for v in range(len(student)) if v != a]
  cross_entropy = {(a, v): np.mean(-np.sum(teacher_probs[a] * np.log(student_probs[v]), axis=-1)) for a, v in pairs}
  kl = {(a, v): np.mean(np.sum(teacher_probs[a] * np.log(teacher_probs[a] / student_probs[v]), axis=-1))
        for a, v in pairs}
  entropy = np.mean(-np.sum(teacher_probs * np.log(teacher_probs), axis=-1))
  grad = np.zeros_like(student)
  for a, v in pairs:
    grad[v] += (student_probs[v] - teacher_probs[a]) / (len(pairs) * student.shape[1] * student_temperature)
  return np.mean(list(cross_entropy.values())), entropy, np.mean(list(kl.values())), grad


def _dino(student, teacher, center, temperatures):
  student_temperature, teacher_temperature = temperatures
  return losses.dino_loss(student, teacher, center, student_temperature=student_temperature,
                          teacher_temperature=teacher_temperature)


@pytest.mark.parametrize("temperatures", DINO_TEMPERATURES)
def test_dino_loss_matches_numpy(dino_logits, temperatures):
  student, teacher, center = dino_logits
  expected_loss, expected_entropy, expected_kl, expected_grad = _reference_dino(*dino_logits, *temperatures)
  (_, result), grad = jax.value_and_grad(_with_result(lambda s: _dino(s, teacher, center, temperatures)),
                                         has_aux=True)(student)
  for value in result:
    assert value.shape == () and value.dtype == jnp.float32
  np.testing.assert_allclose(result.loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(result.teacher_entropy, expected_entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.kl, expected_kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  # The centre's shape (1, K), as the reference and lightly keep it, reads the same.
  np.testing.assert_allclose(_dino(student, teacher, center[None], temperatures).loss, result.loss, rtol=1e-7)


@pytest.mark.parametrize("temperatures", DINO_TEMPERATURES)
def test_dino_loss_and_center_match_lightly(dino_logits, temperatures):
  """lightly's DINOLoss(teacher_out, student_out): lists of (B, K) crops, TEACHER FIRST; it pairs teacher crop
  a with every student crop but student crop a (the diagonal of its (V_t, V_s) matrix), so the student list
  starts with the global crops in the teacher's order, as dino_loss's student_logits do. Its forward reads the
  centre, then moves it: center <- m center + (1 - m) mean over crops and batch of the raw teacher logits."""
  import torch  # pylint: disable=g-import-not-at-top
  from lightly_peer import dino_loss_class  # pylint: disable=g-import-not-at-top
  student, teacher, center = dino_logits
  student_temperature, teacher_temperature = temperatures
  momentum = 0.9
  peer = dino_loss_class()(output_dim=CLASSES, student_temp=student_temperature, center_momentum=momentum)
  peer.center = torch.tensor(center, dtype=torch.float64).reshape(1, 1, CLASSES)
  student_crops, teacher_crops = _torch(student, teacher)
  expected = peer(teacher_out=list(teacher_crops), student_out=list(student_crops),
                  teacher_temp=teacher_temperature)
  expected.backward()
  loss, grad = jax.value_and_grad(lambda s: _dino(s, teacher, center, temperatures).loss)(student)
  np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, student_crops.grad.numpy(), rtol=1e-5, atol=1e-7)
  new_center = losses.dino_center_update(center, teacher, momentum)
  assert new_center.shape == center.shape and new_center.dtype == jnp.float32
  np.testing.assert_allclose(new_center, peer.center.numpy().reshape(CLASSES), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.996])
def test_dino_center_update_matches_numpy(dino_logits, momentum):
  _, teacher, center = dino_logits
  expected = momentum * center + (1 - momentum) * teacher.astype(np.float64).mean(axis=(0, 1))
  np.testing.assert_allclose(losses.dino_center_update(center, teacher, momentum), expected, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(losses.dino_center_update(center[None], teacher, momentum), expected[None],
                             rtol=1e-6, atol=1e-7)
  traced = jax.jit(losses.dino_center_update)(center, teacher, jnp.float32(momentum))
  np.testing.assert_allclose(traced, expected, rtol=1e-6, atol=1e-7)


def test_dino_teacher_and_center_get_no_gradient(dino_logits):
  student, teacher, center = dino_logits
  grads = jax.grad(lambda s, t, c: _dino(s, t, c, (0.1, 0.04)).loss, argnums=(0, 1, 2))(student, teacher, center)
  assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).max() > 0
  np.testing.assert_array_equal(grads[1], np.zeros_like(teacher))
  np.testing.assert_array_equal(grads[2], np.zeros_like(center))
  center_grads = jax.grad(lambda t, c: jnp.sum(losses.dino_center_update(c, t, 0.9)), argnums=(0, 1))(teacher,
                                                                                                       center)
  for grad in center_grads:
    np.testing.assert_array_equal(grad, 0.0)


def test_dino_collapse_monitors(dino_logits):
  """A teacher whose logits equal the centre is uniform: its entropy is ln K. A student that matches it
  exactly (uniform too) leaves no KL, and the loss is then that entropy."""
  student, teacher, center = dino_logits
  uniform_teacher = np.broadcast_to(center, teacher.shape)
  result = _dino(np.zeros_like(student), uniform_teacher, center, (0.1, 0.04))
  np.testing.assert_allclose(result.teacher_entropy, math.log(CLASSES), rtol=1e-6)
  np.testing.assert_allclose(result.kl, 0.0, atol=1e-5)  # loss - entropy: float32 rounding of two ~3.5 nats
  np.testing.assert_allclose(result.loss, math.log(CLASSES), rtol=1e-6)
  sharp = _dino(student, teacher, center, (0.1, 0.04))
  assert 0 < sharp.teacher_entropy < 0.5 * math.log(CLASSES) and sharp.kl > 0


def test_dino_traced_temperatures_and_low_precision_inputs(dino_logits):
  student, teacher, center = dino_logits
  eager = _dino(student, teacher, center, (0.1, 0.05))
  traced = jax.jit(lambda ts, tt: _dino(student, teacher, center, (ts, tt)))(0.1, 0.05)
  for got, want in zip(traced, eager, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  scheduled = jax.jit(lambda step: _dino(student, teacher, center, (0.1, losses.teacher_temperature_schedule(
      step, warmup_from=0.04, final=0.06, warmup_steps=10))))(jnp.int32(5))
  np.testing.assert_allclose(scheduled.loss, eager.loss, rtol=1e-6)
  low = _dino(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16), center, (0.1, 0.04))
  assert all(value.dtype == jnp.float32 for value in low)


def test_teacher_temperature_schedule_ramps_then_holds():
  def schedule(step):
    return losses.teacher_temperature_schedule(step, warmup_from=0.04, final=0.07, warmup_steps=300)
  jitted = jax.jit(schedule)
  for step, expected in ((0, 0.04), (150, 0.055), (300, 0.07), (1000, 0.07)):
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)
    np.testing.assert_allclose(jitted(jnp.int32(step)), expected, rtol=1e-6)
  assert float(losses.teacher_temperature_schedule(0, warmup_from=0.04, final=0.07, warmup_steps=0)) == \
      pytest.approx(0.07)


# --- MoCo v3 ------------------------------------------------------------------------------------------------

def _reference_mocov3_direction(queries, keys, temperature):
  """``2 t`` times the per-row cross-entropy of cosine logits / t with the positive on the diagonal, in
  torch (float64) so autograd gives the queries' gradient; and the top-1 hits."""
  import torch  # pylint: disable=g-import-not-at-top
  logits = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
  logits = logits / temperature
  labels = torch.arange(len(logits))
  per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none") * 2 * temperature
  return per_row, (logits.argmax(dim=1) == labels).double().mean().item()


@pytest.mark.parametrize("temperature", MOCO_TEMPERATURES)
def test_mocov3_loss_matches_the_reference_formula(mocov3_views, temperature):
  q1, q2, k1, k2 = _torch(*mocov3_views)
  first, first_accuracy = _reference_mocov3_direction(q1, k2.detach(), temperature)
  second, second_accuracy = _reference_mocov3_direction(q2, k1.detach(), temperature)
  per_example = first + second
  per_example.mean().backward()
  (_, result), grads = jax.value_and_grad(
      _with_result(lambda a, b: losses.mocov3_loss(a, b, *mocov3_views[2:], temperature=temperature)),
      argnums=(0, 1), has_aux=True)(*mocov3_views[:2])
  np.testing.assert_allclose(result.per_example, per_example.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.loss, per_example.mean().item(), rtol=1e-5)
  np.testing.assert_allclose(result.accuracy, (first_accuracy + second_accuracy) / 2, rtol=1e-6)
  assert 0 < float(result.accuracy) < 1
  for grad, expected in zip(grads, (q1.grad, q2.grad), strict=True):
    np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_mocov3_keys_get_no_gradient(mocov3_views):
  q1, q2, k1, k2 = mocov3_views
  grads = jax.grad(lambda a, b: losses.mocov3_loss(q1, q2, a, b, temperature=0.2).loss, argnums=(0, 1))(k1, k2)
  for grad in grads:
    np.testing.assert_array_equal(grad, 0.0)


# --- Bad inputs ---------------------------------------------------------------------------------------------

_TEMPERATURES = dict(student_temperature=0.1, teacher_temperature=0.04)


@pytest.mark.parametrize("call, argument", [
    (lambda s, t, c: losses.byol_loss(s[0, 0], t[0, 0]), "predictions"),
    (lambda s, t, c: losses.byol_loss(s[0], t[0, :, :-1]), "targets"),
    (lambda s, t, c: losses.dino_loss(s[0], t, c, **_TEMPERATURES), "student_logits"),
    (lambda s, t, c: losses.dino_loss(s, t[..., :-1], c, **_TEMPERATURES), "teacher_logits"),
    (lambda s, t, c: losses.dino_loss(s, t[:, :-1], c, **_TEMPERATURES), "teacher_logits"),
    (lambda s, t, c: losses.dino_loss(s, t, c[:-1], **_TEMPERATURES), "center"),
    (lambda s, t, c: losses.dino_loss(s[:1], t[:1], c, **_TEMPERATURES), "student_logits"),  # no pair left
    (lambda s, t, c: losses.dino_loss(s[:2], np.concatenate([t, t]), c, **_TEMPERATURES), "student_logits"),
    (lambda s, t, c: losses.dino_loss(s, t, c, student_temperature=0.0, teacher_temperature=0.04),
     "student_temperature"),
    (lambda s, t, c: losses.dino_loss(s, t, c, student_temperature=0.1, teacher_temperature=-0.04),
     "teacher_temperature"),
    (lambda s, t, c: losses.dino_center_update(c, t, 1.0), "momentum"),
    (lambda s, t, c: losses.dino_center_update(c, t, -0.1), "momentum"),
    (lambda s, t, c: losses.dino_center_update(c, t[0], 0.9), "teacher_logits"),
    (lambda s, t, c: losses.dino_center_update(c[None, None], t, 0.9), "center"),
    (lambda s, t, c: losses.teacher_temperature_schedule(0, warmup_from=0.04, final=0.07, warmup_steps=-1),
     "warmup_steps"),
    (lambda s, t, c: losses.teacher_temperature_schedule(0, warmup_from=0.0, final=0.07, warmup_steps=10),
     "warmup_from"),
    (lambda s, t, c: losses.mocov3_loss(s[0], s[1, :-1], t[0], t[1], temperature=0.2), "q2"),
    (lambda s, t, c: losses.mocov3_loss(s[0], s[1], t[0, :, :-1], t[1, :, :-1], temperature=0.2), "k1"),
    (lambda s, t, c: losses.mocov3_loss(s[0], s[1], t[0], t[1], temperature=0.0), "temperature"),
])
def test_bad_inputs_raise_naming_the_argument(dino_logits, call, argument):
  with pytest.raises(ValueError, match=argument):
    call(*dino_logits)


# One subprocess with 8 fake CPU devices: every loss of this file, its value, its gradients and DINO's centre,
# for a batch sharded over a 4 x 2 mesh (batch axis 1 of DINO's crops), against the same on 1 device.
_EIGHT_DEVICES_SCRIPT = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sslx import losses, parallel

rng = np.random.default_rng(3)
V_S, V_T, B, K, D = 6, 2, 16, 32, 8
student = rng.normal(size=(V_S, B, K)).astype(np.float32)
teacher = (student[:V_T] + 0.5 * rng.normal(size=(V_T, B, K))).astype(np.float32)
center = (0.3 * rng.normal(size=K)).astype(np.float32)
views = rng.normal(size=(4, B, D)).astype(np.float32)
mesh = jax.make_mesh((4, 2), parallel.DATA_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
crops, rows, whole = (NamedSharding(mesh, P(None, parallel.DATA_AXES)), parallel.batch_sharding(mesh),
                      parallel.replicated(mesh))

def dino(s, t, c):
  result = losses.dino_loss(s, t, c, student_temperature=0.1, teacher_temperature=0.04)
  return result.loss, (result, losses.dino_center_update(c, t, 0.9))

def byol(p, t):
  return losses.byol_loss(p, t).loss, losses.byol_loss(p, t)

def mocov3(q1, q2, k1, k2, mesh=None):
  result = losses.mocov3_loss(q1, q2, k1, k2, temperature=0.2, mesh=mesh)
  return result.loss, result

CASES = {  # name: (loss, its arguments, their shardings)
    "dino": (dino, (student, teacher, center), (crops, crops, whole)),
    "byol": (byol, (views[0], views[2]), (rows, rows)),
    "mocov3": (mocov3, tuple(views), (rows,) * 4),
}
for name, (loss, args, shardings) in CASES.items():
  grad_fn = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
  (value1, aux1), grads1 = jax.jit(grad_fn)(*args)
  sharded = jax.device_put(args, shardings)
  assert all(len(arg.sharding.device_set) == 8 for arg in sharded[:2])
  if name == "mocov3":
    grad_fn = jax.value_and_grad(lambda *a: mocov3(*a, mesh=mesh), argnums=(0, 1, 2, 3), has_aux=True)
  (value8, aux8), grads8 = jax.jit(grad_fn)(*sharded)
  np.testing.assert_allclose(value8, value1, rtol=1e-6, err_msg=name)
  for got, want in zip(jax.tree.leaves(aux8), jax.tree.leaves(aux1)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
  scale = max(float(np.abs(g).max()) for g in grads1)
  for got, want in zip(grads8, grads1):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=name)
  print(name, "matches")
print("all match")
"""


def test_eight_devices_give_the_same_losses_center_and_gradients():
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES_SCRIPT], env=cpu_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "all match" in result.stdout
