"""The linear probe's head, MAE's main_linprobe.py: BatchNorm1d(D, affine=False, eps 1e-6)
-> Linear(D, C) (kernel trunc-normal 0.01, bias 0) over a frozen encoder's features.

flax keeps the biased batch variance in the running average (torch the unbiased one), and
its truncated normal cuts at 2 std (timm's trunc_normal_ at +-2 absolute, i.e. not at all
for std 0.01): both negligible (adpe_jax/train/linprobe.py).
"""

from __future__ import annotations

import flax.linen as nn

BN_EPS = 1e-6


class LinearProbe(nn.Module):
  """MAE: head = Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, C))."""
  num_classes: int

  @nn.compact
  def __call__(self, feats, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS,
                     use_scale=False, use_bias=False, name="bn")(feats)
    return nn.Dense(self.num_classes, name="head",
                    kernel_init=nn.initializers.truncated_normal(0.01))(x)
