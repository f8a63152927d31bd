from moedistill.model.config import ModelConfig, qwen3_30b_a3b, tiny  # noqa: F401
