"""moedistill: knowledge distillation for compressed Mixture-of-Experts language models."""
