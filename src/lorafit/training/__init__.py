"""Training: the recipe (recipe.py: `lorafit train`), the loop, the loss, the optimizer, checkpoints, the run
config, and the runtime (precision, compiling; CPU-specific tuning in cpu/)."""
