"""BEiT: cross-entropy on masked positions only (against numpy), the frozen tokenizer in method state, loaded
from a tokenizer run through config.init_from, precomputed ids, the tokenizer's view, configs and recipes, and
runs through the one loop (command line, resume, 8 devices)."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import log_softmax

import contrastive_helpers as helpers
from sslx import checks
from sslx import init_from
from sslx import masking
from sslx import optim
from sslx import parallel
from sslx import train
from sslx.methods import RunLength
from sslx.methods import beit
from sslx.methods import tokenizer as tokenizer_method
from sslx.models import tokenizer as tokenizer_lib
from test_configs import load_config
from test_configs import vit_param_formula

CONFIG = "beit_fashion_mnist"
# One block of width 32, no drop path, 28 px grey images: a 7 x 7 grid, 19 patches masked in blocks of 4+.
TINY = {"model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.dtype": "float32"}
BATCH, GRID, MASKED, VOCAB = 4, 7, 19, 16


def _config(**overrides):
  return helpers.tiny_config(CONFIG, **{**TINY, **overrides})


def _tokenizer_section():
  """The :test tokenizer's sections, as `use_tokenizer_run` copies them (no run needed to build)."""
  return beit.tokenizer_section(load_config("tokenizer_fashion_mnist", "test"), "unused")


def _mask(rng):
  """The mask `loss_fn` draws from ``rng`` (the first half of its split)."""
  key = jax.random.split(rng)[0]
  return np.asarray(masking.blockwise_mask(key, BATCH, (GRID, GRID), MASKED, min_block=4))


@pytest.fixture(scope="module")
def fresh():
  """A freshly initialised tiny BEiT reading precomputed ids, images of noise and random ids."""
  config = _config(**{"method.token_ids_key": "token_ids", "method.vocab_size": VOCAB})
  method = beit.build(config, RunLength(1, 1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32),
           "token_ids": rng.integers(0, VOCAB, size=(BATCH, GRID, GRID)).astype(np.int32)}
  init = jax.jit(method.init)
  variables, method_state = nn.unbox(init(jax.random.PRNGKey(0), {"image": batch["image"][:1]}))
  assert method_state == {}  # precomputed ids: no tokenizer
  return dict(method=method, model=beit.model_from_config(config), variables=variables, batch=batch,
              loss_fn=jax.jit(method.loss_fn))


def test_loss_is_the_cross_entropy_of_masked_positions_against_numpy(fresh):
  """The head's logits at every position, then numpy's mean of -log softmax[target] over the masked ones."""
  rng = jax.random.PRNGKey(7)
  loss, (metrics, state, model_state) = fresh["loss_fn"](fresh["variables"], {}, fresh["batch"], rng)
  mask = _mask(rng)
  assert mask.shape == (BATCH, GRID * GRID) and list(mask.sum(1)) == [MASKED] * BATCH
  every_position = np.tile(np.arange(GRID * GRID, dtype=np.int32), (BATCH, 1))
  logits = np.asarray(fresh["model"].apply(fresh["variables"], fresh["batch"]["image"], mask, every_position,
                                           train=True), np.float64)
  targets = fresh["batch"]["token_ids"].reshape(BATCH, -1)
  log_probs = np.take_along_axis(log_softmax(logits, axis=-1), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), -log_probs[mask].mean(), rtol=1e-5)
  accuracy = (logits.argmax(-1) == targets)[mask].mean()
  np.testing.assert_allclose(float(metrics["mim_accuracy"]), accuracy, rtol=1e-6)
  assert state == {} and model_state == {}


def test_only_masked_targets_count(fresh):
  rng = jax.random.PRNGKey(8)
  mask = _mask(rng)
  (visible_row, visible_col), (masked_row, masked_col) = np.argwhere(~mask)[0], np.argwhere(mask)[0]

  def loss_with(row, col, shift):
    ids = fresh["batch"]["token_ids"].reshape(BATCH, -1).copy()
    ids[row, col] = (ids[row, col] + shift) % VOCAB
    return float(fresh["loss_fn"](fresh["variables"], {}, {**fresh["batch"], "token_ids": ids}, rng)[0])

  base = loss_with(0, 0, 0)
  assert loss_with(visible_row, visible_col, 5) == base
  assert loss_with(masked_row, masked_col, 5) != base
  # The ids may come as (B, h, w) or (B, L); a grid of another size is refused by name.
  other_grid = {**fresh["batch"], "token_ids": np.zeros((BATCH, 36), np.int32)}
  with pytest.raises(ValueError, match=r"batch\['token_ids'\] \(config.method.token_ids_key\) has shape "
                                       r"\(4, 36\)"):
    fresh["method"].loss_fn(fresh["variables"], {}, other_grid, rng)


def test_embed_is_the_unmasked_encoder(fresh):
  method, variables, images = fresh["method"], fresh["variables"], fresh["batch"]["image"]
  features = method.embed(variables, {}, images)
  _, aux = fresh["model"].encoder.apply(method.encoder_variables(variables, {}), images, train=False)
  assert features.shape == (BATCH, 32) and features.dtype == jnp.float32
  np.testing.assert_array_equal(features, aux["pooled"])


def test_the_tokenizer_is_frozen_method_state_and_gives_the_targets():
  """Params are the encoder and head only (so the optimizer never sees the tokenizer); the loss has no
  gradient with respect to the tokenizer; its targets are the tokenizer's ids of the batch, as precomputed
  ids would be."""
  config = _config(**{"method.tokenizer": _tokenizer_section()})
  method = beit.build(config, RunLength(1, 1))
  images = np.random.default_rng(1).normal(size=(BATCH, 28, 28, 1)).astype(np.float32)
  variables, state = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]}))
  assert set(variables["params"]) == {"encoder", "head"} and set(state) == {"tokenizer"}
  assert set(state["tokenizer"]) == {"params", tokenizer_lib.CODEBOOK}
  assert set(state["tokenizer"]["params"]) == {"encoder"}  # the decoder is never read
  tx, _ = optim.build_optimizer(config, steps_per_epoch=1, total_steps=1)
  opt_leaves = jax.tree_util.tree_leaves_with_path(tx.init(variables["params"]))
  assert opt_leaves and not any("tokenizer" in jax.tree_util.keystr(path) for path, _ in opt_leaves)

  rng = jax.random.PRNGKey(2)
  loss_of_tokenizer = lambda tok: method.loss_fn(variables, {"tokenizer": tok}, {"image": images}, rng)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_of_tokenizer))(state["tokenizer"])
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(grads))

  _, tokenize = beit.target_fn(config)
  ids = np.asarray(tokenize(state, {"image": images}))
  assert ids.shape == (BATCH, GRID * GRID) and len(np.unique(ids)) > 1
  precomputed = beit.build(_config(**{"method.token_ids_key": "ids", "method.vocab_size": 64}),
                           RunLength(1, 1))
  np.testing.assert_allclose(precomputed.loss_fn(variables, {}, {"image": images, "ids": ids}, rng)[0], loss,
                             rtol=1e-6)


def test_the_tokenizer_view_is_the_crop_resized_and_renormalised():
  """A 56 px crop for a 28 px tokenizer: a constant image stays constant, mapped from the ViT's normalisation
  to the tokenizer's; at the same size and statistics the view is the image itself."""
  tokenizer = _tokenizer_section()
  tokenizer.data.update(dict(mean=(0.5,), std=(0.25,)))
  data = load_config(CONFIG, "test").data
  pixel = 0.8
  image = np.full((2, 56, 56, 1), (pixel - data.mean[0]) / data.std[0], np.float32)
  view = np.asarray(beit.tokenizer_view(image, tokenizer, data))
  assert view.shape == (2, 28, 28, 1)
  np.testing.assert_allclose(view, (pixel - 0.5) / 0.25, rtol=1e-5)
  noise = np.random.default_rng(3).normal(size=(2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(beit.tokenizer_view(noise, _tokenizer_section(), data), noise)


# ---------------------------------------------------------------------------------------------------------
# Runs: a tokenizer run, then a BEiT run loading it from the command line.

@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
  """Two steps of the :test tokenizer (`configs/tokenizer_fashion_mnist.py:test`); its workdir."""
  config = load_config("tokenizer_fashion_mnist", "test")
  config.unlock()
  config.update(dict(total_steps=2))
  config.monitor.every_steps = 0
  workdir = str(tmp_path_factory.mktemp("tokenizer") / "run")
  train.train(config, workdir)
  return workdir


def _cli(workdir, tokenizer_run):
  """``python -m sslx.main --config=configs/beit_fashion_mnist.py:test,tokenizer=...``, a checkpoint every
  step (`contrastive_helpers.FLAGS`)."""
  config = f"--config=configs/{CONFIG}.py:test,tokenizer={tokenizer_run}"
  result = subprocess.run([sys.executable, "-m", "sslx.main", config, f"--workdir={workdir}", *helpers.FLAGS],
                          env=helpers.env(1), cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def cli_run(tokenizer_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(CONFIG) / "run"
  out = _cli(workdir, tokenizer_run)
  assert "done: step 6" in out
  assert "method_state/tokenizer/codebook initialised from model_state/codebook" in out
  return workdir


def test_the_run_tokenizes_with_the_tokenizer_runs_encoder_and_codebook(tokenizer_run, cli_run):
  """The tokenizer's encoder and codebook, copied from the tokenizer run, stay unchanged through training and
  out of the optimizer; the ids the BEiT run computes (its method rebuilt from its own config.json) are the
  ones the tokenizer run's encoder and codebook give on the same images."""
  source = helpers.read_state(tokenizer_run, 2)
  for step in (1, 6):
    state = helpers.read_state(cli_run, step)
    copied = [name for name in state if name.startswith("['method_state']['tokenizer']")]
    outside = [name for name in state if "tokenizer" in name and not name.startswith("['method_state']")]
    assert len(copied) > 4 and not outside
    for name in copied:
      origin = name.replace("['method_state']['tokenizer']['params']", "['params']").replace(
          "['method_state']['tokenizer']['codebook']", "['model_state']['codebook']")
      np.testing.assert_array_equal(state[name], source[origin], err_msg=name)
  assert all("mim_accuracy" in row for row in helpers.rows(cli_run).values())

  mesh = parallel.create_mesh(1)
  images = np.random.default_rng(4).normal(size=(8, 28, 28, 1)).astype(np.float32)
  reader = init_from.RunReader(str(cli_run), mesh)
  _, tokenize = beit.target_fn(reader.config)
  ours = np.asarray(tokenize(reader.state()["method_state"], {"image": images}))
  reader.close()
  reader = init_from.RunReader(tokenizer_run, mesh)
  variables = {"params": reader.state()["params"], **reader.state()["model_state"]}
  theirs = tokenizer_lib.token_ids(tokenizer_method.model_from_config(reader.config), variables, images)
  reader.close()
  np.testing.assert_array_equal(ours, np.asarray(theirs).reshape(8, -1))
  assert len(np.unique(ours)) > 1


def test_cli_run_resumes_exactly(tokenizer_run, cli_run, tmp_path):
  """As if killed right after saving step 3: the same command resumes it; steps 4-6 log the same losses and
  end in the same state, bit for bit."""
  expected_rows, expected_state = helpers.rows(cli_run), helpers.read_state(cli_run, 6)
  killed = tmp_path / "killed"
  shutil.copytree(cli_run, killed)
  for step in (4, 5, 6):
    shutil.rmtree(killed / "checkpoints" / str(step))
  assert f"Resumed from {killed / 'checkpoints'}/3" in _cli(killed, tokenizer_run)
  resumed = helpers.rows(killed)
  assert [resumed[step]["loss"] for step in (4, 5, 6)] == [expected_rows[step]["loss"] for step in (4, 5, 6)]
  state = helpers.read_state(killed, 6)
  assert state.keys() == expected_state.keys()
  for name, value in expected_state.items():
    np.testing.assert_array_equal(state[name], value, err_msg=name)


# One batch's loss and gradients with a (random) tokenizer in method state, on 1 device, then with the batch
# (and with 4-way FSDP the parameters and the tokenizer's width-wide convolutions) split over 8 fake CPU
# devices (`sharded_gradients.assert_devices_agree`); argv: `TINY` as JSON.
EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
import contrastive_helpers as helpers
from sharded_gradients import assert_devices_agree
from sslx import methods
from sslx.methods import beit
from test_configs import load_config
section = beit.tokenizer_section(load_config("tokenizer_fashion_mnist", "test"), "unused")
method = methods.build_method(helpers.tiny_config("beit_fashion_mnist", **json.loads(sys.argv[1]),
                                                  **{"method.tokenizer": section}))
images = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
assert_devices_agree(method, images, jax.random.PRNGKey(3), (1, 4))
"""


def test_eight_devices_give_the_loss_and_gradients_of_one():
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps(TINY)], env=helpers.env(8),
                          cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gradients match" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Configs and recipes.

@pytest.mark.parametrize("overrides, message", [
    ({}, r"config\.method\.tokenizer and config\.method\.token_ids_key are both None: .*tokenizer=RUN_DIR"),
    ({"method.token_ids_key": "ids", "method.tokenizer": "SECTION"},
     r"config\.method\.token_ids_key='ids' and config\.method\.tokenizer are both set"),
    ({"method.token_ids_key": "image"}, r"config\.method\.token_ids_key='image' must name a batch key"),
    ({"method.token_ids_key": "ids"}, r"config\.method\.vocab_size=None must be an int"),
    ({"method.mask_ratio": 1.0}, r"config\.method\.mask_ratio=1\.0 must be a number strictly between 0 and"),
    ({"method.mask_ratio": 0.001}, r"config\.method\.mask_ratio=0\.001 masks 0 of the 49 patches \(7x7"),
    ({"method.min_block": 20}, r"config\.method\.min_block=20 exceeds the 19 patches"),
    ({"method.max_block": 2}, r"config\.method\.max_block=2 is below the minimum block of 4 patches"),
    ({"method.decoder": {"width": 8}}, r"config\.method\.decoder is not a BEiT key"),
    ({"model.mask_token": False}, r"config\.model\.mask_token=False: BEiT replaces masked patches"),
    ({"method.tokenizer": "SECTION", "model.variant": "Ti/7"},
     r"makes a 7x7 token grid \(config\.method\.tokenizer\.data\.image_size=28 / \.method\.downsample=4\), "
     r"but config\.model\.variant='Ti/7' at config\.data\.image_size=28 has a 4x4 patch grid"),
    ({"method.tokenizer": "SECTION", "method.vocab_size": 8192},
     r"config\.method\.vocab_size=8192 is not the vocabulary of the tokenizer run .*vocab_size=64"),
    ({"method.tokenizer": "SECTION"}, r"config\.init_from=None loads nothing into method_state/tokenizer"),
])
def test_bad_configs_name_the_key(overrides, message):
  if overrides.get("method.tokenizer") == "SECTION":
    overrides = {**overrides, "method.tokenizer": _tokenizer_section()}
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**overrides))


def test_the_tokenizer_argument_sets_both_keys_and_they_must_agree(tokenizer_run, tmp_path):
  config = load_config(CONFIG, f"test,tokenizer={tokenizer_run}")
  assert config.init_from == tokenizer_method.loading_triples(tokenizer_run, beit.TOKENIZER_STATE)
  assert config.method.tokenizer.data.image_size == 28 and config.method.tokenizer.method.vocab_size == 64
  checks.validate_run_config(config)
  config.unlock()
  width = config.method.tokenizer.method.width
  config.method.tokenizer.method.width = width + 1
  with pytest.raises(checks.ConfigError, match=r"config\.method\.tokenizer differs from the config\.json of "
                                               r"the tokenizer run"):
    checks.validate_run_config(config)
  config.method.tokenizer.method.width = width
  copy_dir = tmp_path / "copy"
  shutil.copytree(tokenizer_run, copy_dir)
  config.init_from = ((str(copy_dir), "params/encoder", "method_state/tokenizer/params/encoder"),)
  message = r"config\.init_from loads method_state/tokenizer/params/encoder from .*copy', but config\.method"
  with pytest.raises(checks.ConfigError, match=message + r"\.tokenizer describes the run"):
    checks.validate_run_config(config)
  # The encoder alone leaves the VQ codebook random; the whole params subtree (decoder ignored) will do.
  encoder, codebook = tokenizer_method.loading_triples(tokenizer_run, beit.TOKENIZER_STATE)
  config.init_from = (encoder,)
  with pytest.raises(checks.ConfigError, match=r"loads nothing into method_state/tokenizer/codebook"):
    checks.validate_run_config(config)
  config.init_from = ((tokenizer_run, "params", "method_state/tokenizer/params"), codebook)
  checks.validate_run_config(config)
  (tmp_path / "mae").mkdir()
  (tmp_path / "mae" / "config.json").write_text(json.dumps({"method": {"name": "mae"}}))
  with pytest.raises(ValueError, match=r"tokenizer='.*mae' is a 'mae' run, not a tokenizer run"):
    beit.use_tokenizer_run(config, str(tmp_path / "mae"))


def test_vitb_recipe():
  config = load_config("beit_vitb")
  assert (config.batch_size, config.num_epochs, config.data.image_size) == (2048, 800, 224)
  model = config.model
  assert (model.variant, model.mask_token, model.drop_path_rate, model.layer_scale, model.rel_pos_bias,
          model.pos_embed) == ("B/16", True, 0.1, 0.1, "shared", "none")
  assert (config.method.vocab_size, config.method.tokenizer, config.init_from) == (8192, None, None)
  opt, schedule = config.optimizer, config.schedule
  assert (opt.name, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm) == ("adamw", 0.9, 0.999, 0.05, 3.0)
  assert (schedule.warmup_epochs, schedule.min_lr, config.data.mean) == (10.0, 1e-5, (0.485, 0.456, 0.406))
  assert config.data.augmentation.startswith("random_resized_crop(224, scale=(0.08, 1.0), interpolation=")
  assert beit.mask_counts(config) == (75, 16, None)
  # 1.5e-3 at batch 2048 after 10 warm-up epochs, at ImageNet's 625 steps per epoch.
  lr = optim.learning_rate_schedule(config, steps_per_epoch=625, total_steps=800 * 625)
  assert [float(lr(epoch * 625)) for epoch in (5, 10)] == pytest.approx([7.5e-4, 1.5e-3])
  config.unlock()
  config.method.token_ids_key = "token_ids"  # builds without a tokenizer run
  method = beit.build(config, RunLength(625, 800 * 625))
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  init = lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"]
  params = nn.unbox(jax.eval_shape(init, image))
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  # + mask token, two gammas per block, one shared table of 27 * 27 + 3 rows per head; no position table.
  assert count(params["encoder"]) == vit_param_formula(768, 12, 16) + 768 + 12 * 2 * 768 + 732 * 12
  assert jax.tree.map(np.shape, params["head"]) == {"kernel": (768, 8192), "bias": (8192,)}
  decays = optim.weight_decay_multipliers(params, opt.wd_mults)
  encoder = decays["encoder"]
  assert (encoder["mask_token"], encoder["rel_pos_bias"]["table"], encoder["block_0"]["mlp"]["fc1"]["kernel"],
          decays["head"]["kernel"]) == (1.0, 1.0, 1.0, 1.0)
  assert (encoder["cls_token"], encoder["block_0"]["gamma_1"], encoder["block_0"]["attn"]["qkv"]["bias"],
          encoder["norm"]["scale"], decays["head"]["bias"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
  local = load_config("beit_vitb", "local")
  assert (local.batch_size, local.data.image_size, local.model.depth) == (8, 64, 2)
  assert local.method.vocab_size is None
  assert beit.mask_counts(local) == (6, 1, None)


def test_fashion_mnist_recipe_uses_the_quick_start_vit_and_data():
  config, quickstart = load_config(CONFIG), load_config("mae_fashion_mnist")
  assert (config.model.variant, config.model.depth) == (quickstart.model.variant, quickstart.model.depth)
  assert config.data.to_dict() == quickstart.data.to_dict()
  assert (config.batch_size, config.num_epochs, config.eval.after_pretrain) == (256, 2, True)
  assert beit.mask_counts(config) == (MASKED, 4, None)
