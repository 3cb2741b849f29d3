"""Command-line tools over `adpe_jax.data`, absl entries like `adpe_jax.main`:

  check    python -m adpe_jax.tools.check --source=folder:/data/imagenet [--out=bad.txt]
           decode every image of a source and list the bad files (data.skip_list takes it)
  prepare  python -m adpe_jax.tools.prepare --source=folder:/data/imagenet --out=DIR
           write a source once as ArrayRecord shards of bounded-side JPEGs ("prepared:DIR")

The library code they run stays in data/ (`data.check`, `data.prepare`); the earlier
command lines `python -m adpe_jax.data.check` / `adpe_jax.data.prepare` run these tools.
"""
