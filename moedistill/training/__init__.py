"""The distillation machinery: loss, fused vocab statistics, regex groups and optimizer, the
jitted step, the stage loop, checkpoints, held-out metrics, the batched sweep and the sweep
report."""
