"""Weights out: convert.to_torch (exact inverse of from_torch) and the timm export; our
classifier's readouts (the fine-tune head, the probe's and k-NN's features) against timm's
pooling on the exported weights.

timm's VisionTransformer is the reference (PyPI timm, CPU torch: the `test` extra).  The
PyPI torchvision wheels timm depends on are CUDA builds that fail to import next to the
+cpu torch; timm's ViT model code never uses torchvision, so when it cannot be imported the
`timm_vit` fixture imports timm with an empty stand-in for torchvision.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adpe_jax import checkpoint, convert, export, weights
from adpe_jax.config import pretrain as pretrain_config
from adpe_jax.config import probe as probe_config
from adpe_jax.models.mae import MAEPlus
from adpe_jax.models.classifier import ViTClassifier
from adpe_jax.train import evaluate
from adpe_jax.train.state import build_model, init_variables
from adpe_jax.train import mixup
from adpe_jax.train.state import build_classifier, init_classifier_params

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"

KINDS = [("ape", "none", "per_bucket"), ("ape", "embedding", "per_bucket"),
         ("ape", "coordinate", "per_bucket"), ("rpe", "none", "per_bucket"),
         ("rpe", "embedding", "per_bucket"), ("rpe", "embedding", "faithful"),
         ("rpe", "coordinate", "per_bucket")]


def _config(pe, adv, rpe_embedding):
  c = pretrain_config.seed_config(pe, adv, "smoke")
  c.adversary.rpe_embedding = rpe_embedding
  return c


class _Stub(types.ModuleType):
  __path__: list = []

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)

    class _Any(type):
      def __getattr__(cls, a):
        if a.startswith("__"):
          raise AttributeError(a)
        return a
    return _Any(name, (), {"__init__": lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):  # noqa: ARG002
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _Stub(spec.name)

  def exec_module(self, module):
    pass


@pytest.fixture(scope="module")
def timm_module():
  try:
    import timm
  except ImportError as e:
    if "timm" in str(e) and "torchvision" not in str(e):
      pytest.skip("timm is not installed (pip install -e '.[test]')")
    timm = None
  except RuntimeError:
    timm = None
  if timm is None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
      del sys.modules[name]
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
      timm = importlib.import_module("timm")
    finally:
      sys.meta_path.remove(finder)
  return timm


@pytest.fixture(scope="module")
def timm_vit(timm_module):
  return importlib.import_module("timm.models.vision_transformer").VisionTransformer


def test_randaugment_ops_match_timm(timm_module):
  """Each op of adpe_jax.data.finetune.RandAugment is timm's AugmentOp, pixel for pixel
  (create_transform's hparams: ImageNet-mean fill, bicubic), at several magnitudes and
  both signs (timm draws the sign with random.random(); seeded here to know it)."""
  import random
  from PIL import Image
  from adpe_jax.data import finetune as ft_data
  aa = importlib.import_module("timm.data.auto_augment")
  hparams = dict(translate_const=int(28 * 0.45), img_mean=ft_data.FILL,
                 interpolation=Image.BICUBIC)
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (7, 7, 3)).astype(np.uint8)
  img = Image.fromarray(base).resize((28, 28), Image.BICUBIC)   # smooth colour image
  assert list(ft_data.RAND_INCREASING_OPS) == aa._RAND_INCREASING_TRANSFORMS
  for name in ft_data.RAND_INCREASING_OPS:
    for m in (0.0, 4.5, 9.0):
      for seed in (0, 3):
        op = aa.AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams)
        random.seed(seed)
        negate = random.random() > 0.5
        random.seed(seed)
        want = np.asarray(op(img))
        got = np.asarray(ft_data.apply_op(img, name, m, negate))
        assert np.array_equal(got, want), (name, m, negate)


def _real_images(n=8, size=28):
  if os.path.exists(FMNIST):
    from adpe_jax.data import read_idx
    from adpe_jax.data.multicrop import normalize
    raw = read_idx(FMNIST)[:n, :, :, None]
    return normalize(np.ascontiguousarray(raw))
  return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("kind", KINDS, ids=["-".join(k) for k in KINDS])
def test_to_torch_inverts_from_torch_for_every_kind(kind, tmp_path):
  """A saved pretraining checkpoint of every adversary kind -> the original's state dict
  (no missing / unexpected keys: from_torch raises on either) -> back, bit for bit."""
  config = _config(*kind)
  v = init_variables(build_model(config), jax.random.key(1))
  v = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(2), x.shape), v)
  with checkpoint.Checkpointer(tmp_path, 1, metadata={"k": "-".join(kind)}) as ckpt:
    ckpt.maybe_save(1, {"params": v["params"], "adversary": v["adversary"]}, force=True)
  params = weights.load(tmp_path).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, v["params"])
  model = build_model(config)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  sd = convert.to_torch(v, model.grid)
  back = convert.from_torch(sd, shapes, grid=model.grid)
  fa, fb = traverse_util.flatten_dict(back), traverse_util.flatten_dict(
      jax.tree.map(np.asarray, dict(v)))
  assert set(fa) == set(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k
  # torch tensors (as torch.save would hold them) convert the same way.
  back_t = convert.from_torch({k: torch.from_numpy(np.array(a)) for k, a in sd.items()}, shapes,
                              grid=model.grid)
  assert all(np.array_equal(a, fb[k]) for k, a in traverse_util.flatten_dict(back_t).items())


def test_pretrained_encoder_equals_timm_vit(timm_vit):
  """What export's docstring promises for a pretraining encoder, in timm: a strict load
  with global_pool='token' reads the cls token after norm, with global_pool='avg',
  fc_norm=False the mean of norm(x)'s patch tokens; global_pool='avg' alone refuses it."""
  model = MAEPlus(image_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
  params = init_variables(model, jax.random.key(0))["params"]
  params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(5), a.shape),
                        params)  # no zero biases / unit norms: each tensor matters
  x = _real_images()
  ours = jax.jit(lambda p, im: model.apply({"params": p}, im, method=MAEPlus.features))(params, x)
  sd = export.timm_state_dict(params, {"image_size": 28, "model": {"patch_size": 4}})
  sd = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  kw = dict(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=0)

  def timm_out(**pool):
    ref = timm_vit(**kw, **pool)
    missing, unexpected = ref.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    ref.eval()
    with torch.no_grad():
      return ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

  assert _rel_err(ours, timm_out(global_pool="avg", fc_norm=False)) < 1e-5
  # The cls readout: the same encoder as a cls-token classifier trunk of ours.
  cls_model = ViTClassifier(num_classes=2, image_size=28, patch_size=4, embed_dim=32, depth=2,
                            num_heads=4, global_pool=False, drop_path=0.0)
  cls_params = cls_model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  cls_params = dict(cls_params, **{k: v for k, v in params.items()
                                   if k in ("patch_embed", "cls_token", "norm")
                                   or k.startswith("blocks_")})
  cls = jax.jit(lambda p, im: cls_model.apply({"params": p}, im, features="cls"))(cls_params, x)
  assert _rel_err(cls, timm_out(global_pool="token")) < 1e-5
  with pytest.raises(RuntimeError, match="fc_norm"):
    timm_out(global_pool="avg")


def test_finetuned_classifier_equals_timm_vit(timm_vit):
  model = ViTClassifier(num_classes=10, image_size=28, patch_size=4, embed_dim=32, depth=2,
                        num_heads=4)
  p = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  p = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(3), a.shape), p)
  x = _real_images()
  logits = jax.jit(lambda q, im: model.apply({"params": q}, im))(p, x)
  ref = timm_vit(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                 global_pool="avg", fc_norm=True)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in export.timm_state_dict(p, {}).items()},
                      strict=True)
  ref.eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert _rel_err(logits, want) < 1e-5


def _timm_forward(timm_vit, state_dict, x, **kw):
  """timm's VisionTransformer(**kw) with `state_dict` loaded strictly, applied to NHWC `x`."""
  ref = timm_vit(**kw)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                      strict=True)
  ref.eval()
  with torch.no_grad():
    return ref(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)).numpy()


def _perturbed(params, seed):
  """Params with every leaf moved off its init (LayerNorm scales != 1, biases != 0, a cls
  token unlike the patch tokens), so that no readout matches another by accident."""
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
  return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape, a.dtype),
                      params)


def test_token_pool_classifier_equals_timm_token_pool(timm_vit):
  """global_pool=False classifies the cls token after the final norm: timm's
  global_pool="token" (norm -> x[:, 0] -> head) on the same weights gives the same logits."""
  model = ViTClassifier(num_classes=10, image_size=28, patch_size=4, embed_dim=32, depth=2,
                        num_heads=4, global_pool=False)
  p = _perturbed(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"], 1)
  assert "norm" in p and "fc_norm" not in p
  x = _real_images()
  logits = jax.jit(lambda q, im: model.apply({"params": q}, im))(p, x)
  want = _timm_forward(timm_vit, export.timm_state_dict(p, {}), x, img_size=28, patch_size=4,
                       embed_dim=32, depth=2, num_heads=4, num_classes=10, global_pool="token")
  assert _rel_err(logits, want) < 1e-5


def test_probe_readouts_equal_timm_pooling(timm_vit):
  """The frozen encoder the linear probe and the k-NN entry read (evaluate.load_encoder,
  model.pool) equals timm's headless ViT on the same weights: "cls" (the probe's default,
  MAE's linear probe) is global_pool="token" (final norm, then token 0); "mean" is
  global_pool="avg" without fc_norm (final norm, then the patch-token mean); "avg" (MAE's
  --global_pool probe) is global_pool="avg" with an identity-affine fc_norm in place of the
  final norm."""
  assert probe_config.linprobe_config().model.pool == "cls"
  x = _real_images()
  for pool in evaluate.POOLS:
    c = probe_config.apply_smoke(probe_config.linprobe_config())
    c.model.pool = pool
    encoder, _, _ = evaluate.load_encoder(c)
    params = _perturbed(encoder.params, 2)
    feats = dataclasses.replace(encoder, params=params).features(x, 4)
    m = encoder.fn.module
    geometry = dict(img_size=m.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                    depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=0)
    sd = export.timm_state_dict(params, {})
    if pool == "cls":
      want = _timm_forward(timm_vit, sd, x, global_pool="token", **geometry)
    elif pool == "mean":
      want = _timm_forward(timm_vit, sd, x, global_pool="avg", fc_norm=False, **geometry)
    else:
      sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
      sd["fc_norm.weight"] = np.ones(m.embed_dim, np.float32)
      sd["fc_norm.bias"] = np.zeros(m.embed_dim, np.float32)
      want = _timm_forward(timm_vit, sd, x, global_pool="avg", fc_norm=True, **geometry)
    assert feats.shape == want.shape == (len(x), m.embed_dim), pool
    assert _rel_err(feats, want) < 1e-5, pool


def test_mae_finetune_pth_initialises_the_same_encoder(timm_vit, tmp_path):
  """A facebookresearch/mae fine-tune checkpoint (timm's VisionTransformer with global
  pooling and fc_norm, saved as {"model": state_dict}) initialises our fine-tune model to
  the same function: with the same fc_norm and head, the logits equal timm's."""


def test_mae_finetune_pth_initialises_the_same_classifier(timm_vit, tmp_path):
  """A facebookresearch/mae fine-tune checkpoint (timm's VisionTransformer with global
  pooling and fc_norm, saved as {"model": state_dict}) initialises our fine-tune model to
  the same function: its fc_norm and head fit, are loaded, and the logits equal timm's.
  Into a model with another number of classes the head starts fresh (fc_norm is loaded,
  as the original's strict=False load does)."""
  from adpe_jax.config import finetune as finetune_config
  torch.manual_seed(0)
  ref = timm_vit(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                 global_pool="avg", fc_norm=True)
  with torch.no_grad():  # MAE-trained-like weights: no zero biases, a non-trivial pos_embed
    for v in ref.parameters():
      v.add_(0.05 * torch.randn_like(v))
  path = tmp_path / "mae_finetuned_vit_test.pth"
  torch.save({"model": ref.state_dict()}, path)
  c = finetune_config.recipe("base", "ape", "smoke")
  c.init = str(path)
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  assert info["init"] == str(path)
  assert (info["init_kind"], info["init_head"]) == ("mae", "loaded")
  ref.eval()
  x = _real_images()
  logits = jax.jit(lambda q, im: model.apply({"params": q}, im))(params, x)
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert _rel_err(logits, want) < 1e-5
  c.data.num_classes = 7
  model = build_classifier(c)
  fresh = jax.jit(lambda k: init_classifier_params(model, k))(jax.random.key(0))
  params, info = weights.init_classifier(c, model, fresh)
  assert info["init_head"] == "fresh"
  jax.tree.map(np.testing.assert_array_equal, params["head"], fresh["head"])
  np.testing.assert_array_equal(params["fc_norm"]["scale"], ref.fc_norm.weight.detach().numpy())
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"],
                                ref.blocks[1].mlp.fc2.weight.detach().numpy().T)


def test_export_cli_writes_safetensors_and_pth(tmp_path):
  config = _config("ape", "coordinate", "per_bucket")
  v = init_variables(build_model(config), jax.random.key(4))
  workdir = tmp_path / "run"
  meta = {"model": {"variant": "test", "patch_size": 4, "pe": "ape"}, "image_size": 28}
  with checkpoint.Checkpointer(workdir, 1, metadata=meta) as ckpt:
    ckpt.maybe_save(3, {"params": v["params"], "adversary": v["adversary"]}, force=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  outs = {}
  for ext in ("safetensors", "pth"):
    out = tmp_path / f"enc.{ext}"
    r = subprocess.run([sys.executable, "-m", "adpe_jax.export", f"--workdir={workdir}",
                        f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["irpe_tables"] is False
    outs[ext] = out
  from safetensors.numpy import load_file
  st = load_file(str(outs["safetensors"]))
  pt = {k: t.numpy() for k, t in torch.load(outs["pth"], weights_only=True)["model"].items()}
  assert set(st) == set(pt) and all(np.array_equal(st[k], pt[k]) for k in st)
  assert not any(k.startswith(("decoder", "mask_token")) or "adv" in k for k in st)
  assert st["pos_embed"].shape == (1, 50, 32) and "norm.weight" in st
  r = subprocess.run([sys.executable, "-m", "adpe_jax.export", f"--workdir={tmp_path / 'none'}",
                      f"--out={tmp_path / 'x.pth'}"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")


def test_mixup_targets_match_timm(timm_module):
  timm_mixup = importlib.import_module("timm.data.mixup")
  y = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  x = np.random.default_rng(0).normal(size=(8, 4, 4, 3)).astype(np.float32)
  for lam in (1.0, 0.62, 0.2):
    want = timm_mixup.mixup_target(torch.from_numpy(y), 10, lam=lam, smoothing=0.1).numpy()
    got = mixup.mix_batch(x, y, lam, False, np.zeros(4, np.int32), 10, 0.1)[1]
    np.testing.assert_allclose(got, want, atol=1e-6)
