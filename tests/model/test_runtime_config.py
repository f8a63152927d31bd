"""Every Runtime field travels from the config to the model unchanged: config.py builds the
Runtime field by field (dataclasses.fields), hf.load_model takes it whole."""
import dataclasses

import jax.numpy as jnp
import pytest

from moedistill.config import job_from_config
from moedistill.errors import ConfigError
from moedistill.hub import hf
from moedistill.model.layers import Runtime
from tests.conftest import job_config

# A value other than the default for each field, as a user writes it in the config, and what
# the model's Runtime holds for it. Adding a Runtime field without a row here fails the test.
NON_DEFAULT = {
    "dtype": ("bfloat16", jnp.bfloat16),
    "param_dtype": ("bfloat16", jnp.bfloat16),
    "moe_backend": ("ragged", "ragged"),
    "capacity_factor": (2.0, 2.0),
    "ep_capacity_factor": (1.5, 1.5),
    "remat": ("full", "full"),
    "attention": ("blocked", "blocked"),
    "attention_block": (16, 16),
    "scan_layers": (True, True),
}


def test_every_runtime_field_reaches_the_model(tmp_path, hf_tiny):
  fields = [f.name for f in dataclasses.fields(Runtime)]
  assert sorted(NON_DEFAULT) == sorted(fields)
  c = job_config(tmp_path, str(hf_tiny[0]))
  for name, (value, _) in NON_DEFAULT.items():
    c.model[name] = value
  job = job_from_config(c)
  model, _ = hf.load_model(hf_tiny[0], job.model)
  for name, (_, want) in NON_DEFAULT.items():
    got = getattr(model.runtime, name)
    assert got == want and got != getattr(Runtime(), name), name


def test_a_field_missing_from_the_config_takes_the_runtime_default(tmp_path, hf_tiny):
  c = job_config(tmp_path, str(hf_tiny[0]))
  del c.model["attention_block"]
  assert job_from_config(c).model.attention_block == Runtime().attention_block


def test_an_unknown_model_field_is_refused_by_name(tmp_path, hf_tiny):
  c = job_config(tmp_path, str(hf_tiny[0]))
  c.model.unlock()
  c.model.flash = True
  with pytest.raises(ConfigError, match=r"^config.model.flash: unknown field"):
    job_from_config(c)
