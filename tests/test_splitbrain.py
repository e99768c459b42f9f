"""Split-brain autoencoder: half-width halves that share no parameter, each loss reaching only its own half
(ViT and ResNet), the L-bin loss against numpy, the concatenated embedding, bad configs, and a command-line
run on an image folder that resumes exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import color

import contrastive_helpers as helpers
from sslx import checks
from sslx import methods
from sslx.methods import splitbrain
from test_colorization import assert_folder_run_resumes_exactly, colour_images, folder_run, normalised

CONFIG = "splitbrain_folder"


def test_l_bins_and_their_cross_entropy_against_numpy():
  lightness = np.array([0.0, 1.99, 2.0, 57.3, 99.99, 100.0])
  np.testing.assert_array_equal(splitbrain.l_bin_labels(jnp.asarray(lightness), 50), [0, 0, 1, 28, 49, 49])
  rng = np.random.default_rng(0)
  logits, labels, mask = rng.normal(size=(2, 2, 3, 50)), rng.integers(0, 50, (2, 2, 3)), np.array([0.0, 1.0])
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, labels[..., None], -1)[1].mean()
  assert float(splitbrain.l_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask)) == pytest.approx(
      expected, rel=1e-5)


@pytest.fixture(scope="module", params=["test", "test,encoder=resnet"])
def halves(request):
  """A fresh split-brain model on 4 images (one grey), and each loss term's gradients."""
  config = helpers.load_config(CONFIG, request.param)
  config.unlock()
  config.data.data_dir = "unused"
  method = methods.build_method(config)
  images = normalised(colour_images(4, grey=(3,)), config)
  variables, state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": images[:1]}))

  def term(name):
    def value(params):
      _, (metrics, _, _) = method.loss_fn({**variables, "params": params}, state, {"image": images},
                                          jax.random.PRNGKey(1))
      return metrics[name]
    return value

  grads = jax.jit(lambda p: (jax.grad(term("ab_loss"))(p), jax.grad(term("l_loss"))(p), term("loss")(p),
                             term("ab_loss")(p) + term("l_loss")(p)))(variables["params"])
  return dict(config=config, method=method, variables=variables, state=state, images=images, grads=grads)


def _nonzero(tree):
  return any(float(np.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(tree))


def test_halves_are_disjoint_half_width_networks(halves):
  params, config = halves["variables"]["params"], halves["config"]
  assert sorted(params) == ["ab_encoder", "ab_head", "encoder", "head"]
  assert params["head"]["kernel"].shape[-1] == 261 and params["ab_head"]["kernel"].shape[-1] == 50
  full = config.model.width
  widths = {name: params[name]["kernel"].shape[0] for name in ("head", "ab_head")}
  # ResNet-18: 8 x width at stage 4.
  feature_width = full // 2 if config.model.name == "vit" else full // 2 * 8
  assert widths == {"head": feature_width, "ab_head": feature_width}
  assert jax.tree.structure(params["encoder"]) == jax.tree.structure(params["ab_encoder"])


def test_each_loss_reaches_only_its_half(halves):
  ab_grads, l_grads, loss, total = halves["grads"]
  assert float(loss) == pytest.approx(float(total), rel=1e-6)
  for name in ("encoder", "head"):
    assert _nonzero(ab_grads[name]) and not _nonzero(l_grads[name])
    assert _nonzero(l_grads[f"ab_{name}"]) and not _nonzero(ab_grads[f"ab_{name}"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((ab_grads, l_grads)))


def test_embed_concatenates_both_halves_on_l_and_ab(halves):
  method, variables, state, images, config = (halves[k] for k in ("method", "variables", "state", "images",
                                                                  "config"))
  features = method.embed(variables, state, images)
  lab = color.rgb2lab(np.clip(images * np.asarray(config.data.std) + np.asarray(config.data.mean), 0, 1))
  encoder = splitbrain.models.encoder_from_config(splitbrain.half_model_config(config.model))
  pick = lambda scope: {k: v[scope] for k, v in variables.items() if scope in v}
  _, l_aux = encoder.apply(pick("encoder"), ((lab[..., :1] - 50) / 50).astype(np.float32), train=False)
  _, ab_aux = encoder.apply(pick("ab_encoder"), (lab[..., 1:] / 110).astype(np.float32), train=False)
  np.testing.assert_allclose(features, np.concatenate([l_aux["pooled"], ab_aux["pooled"]], -1), rtol=1e-4,
                             atol=1e-5)
  pictures = method.visualize(variables, state, {"image": images}, jax.random.PRNGKey(0))
  assert list(pictures) == ["grey", "prediction", "truth", "l_from_ab"]


@pytest.mark.parametrize("overrides, message", [
    ({"method.l_bins": 1}, r"config\.method\.l_bins=1 must be an int"),
    ({"method.loss": "l2"}, r"config\.method\.loss is not a split-brain key"),
    ({"model.num_heads": 1}, r"config\.model\.num_heads=1 is odd"),
    ({"method.grey_threshold": -1.0}, r"config\.method\.grey_threshold=-1\.0 must be"),
])
def test_bad_configs_name_the_key(overrides, message):
  config = helpers.tiny_config(CONFIG, **{"data.data_dir": "unused"})
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(config)


def test_each_half_must_be_a_valid_encoder():
  """A sin-cos ViT of width 4 is valid, its half of width 2 is not."""
  config = helpers.tiny_config(CONFIG, **{"data.data_dir": "unused", "model.width": 4})
  with pytest.raises(checks.ConfigError, match=r"config\.model: each split-brain half .*width=2 must be"):
    checks.validate_run_config(config)


def test_batchnorm_groups_must_split_the_batch_each_half_reads():
  config = helpers.load_config(CONFIG, "test,encoder=resnet")
  config.unlock()
  config.data.data_dir, config.model.bn_groups = "unused", 3
  with pytest.raises(checks.ConfigError, match=r"config\.model\.bn_groups=3 must split the 32 rows"):
    checks.validate_run_config(config)


def test_cli_run_on_an_image_folder_resumes_exactly(tmp_path_factory, tmp_path):
  workdir, data_dir = folder_run(CONFIG, tmp_path_factory)
  rows = helpers.rows(workdir)
  assert all(row["loss"] == pytest.approx(row["ab_loss"] + row["l_loss"], rel=1e-5) for row in rows.values())
  assert_folder_run_resumes_exactly(CONFIG, workdir, data_dir, tmp_path)
