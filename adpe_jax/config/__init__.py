"""Experiment configs (ml_collections) of every task and their validation.

  common    the fields every task shares: mesh, distributed, run cadence, parse_arg
  pretrain  MAE+ / AdPE pretraining (the default task): base_config, seed_config, smoke
  finetune  fine-tuning a classifier (task "finetune"): finetune_config, recipe, smoke
  probe     frozen-encoder evaluations (tasks "knn" and "linprobe")
  encoder   their encoder fields left auto, resolved from a checkpoint's run metadata
  validate  the checks, public: each raises ConfigError naming the field

One vocabulary across tasks: `model.pe` is "ape" or "rpe"; `model.rpe_lookup` is
"integer" or "continuous" (the original's fine-tune `--pe_type 0/1/2` is pe ape / rpe +
integer / rpe + continuous); `model.rpe_query` is the fine-tune model's iRPE query
("unscaled", the original's, spec 9.2, or "scaled"); "faithful" names only the original's
no-op RPE embedding adversary (`adversary.rpe_embedding`, the pretraining argument).
"""
