"""Attention kernels: `adpe_jax.kernels.attention.attention` (the interface every block
calls; `xla` reference and `pallas`) and `adpe_jax.kernels.rpe_attention` (the fused
Pallas iRPE kernel).  Nothing is re-exported here: the submodule `attention` and the
function of the same name would shadow each other."""
