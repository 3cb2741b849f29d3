"""The training tasks: pretraining, fine-tuning, linear probe and k-NN (state, optimizers, the
compiled steps, the loops and the evaluators)."""
