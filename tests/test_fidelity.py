"""Fidelity to the original PyTorch AdPE: same weights, images and masking noise give the
same loss, prediction, mask, encoder output and every parameter gradient.

The reference vectors were produced by the original code (tests/data/README.md); the
comparison goes through `adpe_jax.convert.from_torch`, in float64.
"""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from adpe_jax import convert
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax import layout
from adpe_jax.train.state import build_model, init_variables
from conftest import DATA

VARIANTS = {
    # file: (model.pe, adversary.kind, adversary.rpe_embedding, float64?)
    "ape_adv0": ("ape", "none", "faithful", True),
    "ape_adv1": ("ape", "embedding", "faithful", True),
    "ape_adv2": ("ape", "coordinate", "faithful", True),
    "rpe_adv0": ("rpe", "none", "faithful", True),
    "rpe_adv1": ("rpe", "embedding", "faithful", True),
    "rpe_adv2": ("rpe", "coordinate", "faithful", False),
}


def reference_config(name):
  pe, kind, rpe_emb, _ = VARIANTS[name]
  meta = json.loads((DATA / f"{name}.json").read_text())
  c = pretrain_config.base_config()
  c.model.variant = "reference"
  c.model.patch_size = meta["model"]["patch_size"]
  c.image_size = meta["model"]["img_size"]
  c.mask_ratio = meta["mask_ratio"]
  c.model.pe = pe
  c.adversary.kind = kind
  c.adversary.rpe_embedding = rpe_emb
  return c


def _from_torch(state_dict, c, dtype=None):
  """convert.from_torch into the variables' shapes of the model of config `c`."""
  model = build_model(c)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  return convert.from_torch(state_dict, shapes, grid=model.grid, dtype=dtype)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def run_reference(name, scan_blocks=False):
  ref = dict(np.load(DATA / f"{name}.npz"))
  f64 = VARIANTS[name][3]
  dtype = np.float64 if f64 else np.float32
  c = reference_config(name)
  c.model.scan_blocks = scan_blocks   # from_torch stacks the blocks for a scanned model
  model = build_model(c)
  state_dict = {k: v for k, v in ref.items()
                if not k.startswith("grad/") and k not in
                ("images", "noise", "ids_shuffle", "loss", "pred", "mask", "latent")}
  variables = _from_torch(state_dict, c, dtype=dtype)
  images = ref["images"].transpose(0, 2, 3, 1).astype(dtype)
  noise = ref["noise"]

  def loss_fn(params, adversary):
    (loss, pred, mask), inter = model.apply({"params": params, "adversary": adversary}, images,
                                            noise=noise, mutable=["intermediates"])
    return loss, (pred, mask, inter["intermediates"]["latent"][0])

  # One value_and_grad for both collections, as the train step takes it.
  (loss, (pred, mask, latent)), grads = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
          variables["params"], variables["adversary"])
  assert layout.is_scanned(grads[0]) == scan_blocks
  grads = layout.to_unrolled(grads)   # compared block by block with the original's names
  grads = {("params",) + k: v for k, v in traverse_util.flatten_dict(grads[0]).items()} | {
      ("adversary",) + k: v for k, v in traverse_util.flatten_dict(grads[1]).items()}
  ref_grads = {}
  for k, v in ref.items():
    if k.startswith("grad/"):
      name_ = k[len("grad/"):]
      path, arr = convert.convert_tensor(name_, v, convert.is_layernorm(name_))
      ref_grads[(convert.collection_of(name_),) + path] = arr
  has_adversary = VARIANTS[name][1] != "none"
  assert bool(variables["adversary"]) == has_adversary
  assert all(("adv" in k[-1]) == (k[0] == "adversary") for k in grads)
  return ref, loss, pred, mask, latent, grads, ref_grads


@pytest.fixture(scope="module")
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_original(name, x64):
  check_matches_original(name)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_original_with_scanned_blocks(name, x64):
  """The same vectors through model.scan_blocks (one nn.scan per block stack)."""
  check_matches_original(name, scan_blocks=True)


def check_matches_original(name, scan_blocks=False):
  f64 = VARIANTS[name][3]
  tol = 1e-10 if f64 else 2e-5
  ref, loss, pred, mask, latent, grads, ref_grads = run_reference(name, scan_blocks)
  assert np.array_equal(np.asarray(mask), ref["mask"])
  assert abs(float(loss) - float(ref["loss"])) <= (1e-12 if f64 else 1e-6) * abs(float(ref["loss"]))
  assert _rel_err(latent, ref["latent"]) < tol
  assert _rel_err(pred, ref["pred"]) < tol
  assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
  for path, g in grads.items():
    assert g.shape == ref_grads[path].shape, path
    if name == "rpe_adv1" and path[-1] == "adv_token":
      # The original's RPE embedding adversary is a no-op under softmax (spec 4.4): its
      # gradient is pure round-off on both sides, so compare with an absolute bound.
      assert np.max(np.abs(g)) < 1e-15 and np.max(np.abs(ref_grads[path])) < 1e-15
      continue
    assert _rel_err(g, ref_grads[path]) < tol, ("/".join(path), _rel_err(g, ref_grads[path]))


def test_from_torch_refuses_other_geometry_and_unknown_keys():
  ref = dict(np.load(DATA / "ape_adv0.npz"))
  state_dict = {k: v for k, v in ref.items() if not k.startswith("grad/") and k not in
                ("images", "noise", "ids_shuffle", "loss", "pred", "mask", "latent")}
  c = reference_config("ape_adv0")
  from adpe_jax.models import posembed
  ok = dict(state_dict, pos_embed=posembed.sincos_table(7, 64)[None])
  _from_torch(ok, c)  # the original's own 7x7 table is accepted
  bad = dict(state_dict, pos_embed=posembed.sincos_table(14, 64)[None])
  with pytest.raises(convert.ConversionError, match="7x7 grid"):
    _from_torch(bad, c)
  with pytest.raises(convert.ConversionError, match="unexpected"):
    _from_torch(dict(state_dict, **{"blocks.9.norm1.weight": np.ones(64)}), c)
  c.model.pe = "rpe"
  with pytest.raises(convert.ConversionError, match="missing"):
    _from_torch(state_dict, c)
