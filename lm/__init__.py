"""lm: sharded JAX/Flax pretraining, CIFAR-10 baselines and sweeps."""
