"""Model sizes (spec 2.1) plus small variants for tests and the demo."""

from __future__ import annotations

# name: (embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads)
VARIANTS = {
    # Test size: compiles in seconds on a 2-core CPU.
    "test": (32, 2, 4, 32, 1, 4),
    # The size of shared/reference/vectors (the original's outputs for fixed weights).
    "reference": (64, 2, 4, 32, 1, 4),
    # Demo / laptop size.
    "tiny": (192, 4, 3, 128, 2, 4),
    # The tiny widths at depth 12: the size of the side-by-side CPU benchmarks against the
    # original (benchmarks/peer_pytorch.py, benchmarks/train_step.py).
    "tiny12": (192, 12, 3, 128, 2, 4),
    "small": (384, 12, 6, 256, 4, 8),
    # The original's factories adpe_vit_{base,large}_patch16, adpe_vit_huge_patch14.
    "base": (768, 12, 12, 512, 8, 16),
    "large": (1024, 24, 16, 512, 8, 16),
    "huge": (1280, 32, 16, 512, 8, 16),
}


def model_kwargs(variant: str) -> dict:
  if variant not in VARIANTS:
    raise ValueError(f"config field model.variant={variant!r} is unknown; allowed: "
                     f"{', '.join(VARIANTS)}.")
  e, d, h, de, dd, dh = VARIANTS[variant]
  return dict(embed_dim=e, depth=d, num_heads=h, decoder_embed_dim=de, decoder_depth=dd,
              decoder_num_heads=dh)
