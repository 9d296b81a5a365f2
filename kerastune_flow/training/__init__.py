"""Training: a recipe's run (train), one fit, the frozen stage and the staged fine-tune, caches, callbacks, resume,
the learning-rate range test and find-lr."""
