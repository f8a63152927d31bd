"""train refuses bad input with one line naming the value: exit 2, no traceback, nothing
written; a non-finite loss stops at the step it happened and keeps the good checkpoints."""
import pytest

from conftest import job_config, run_cli, snapshot, write_config_file

CASES = {
    "alpha_above_one": ({"train.alpha": 1.5}, "config.train.alpha=1.5"),
    "temperature_zero": ({"train.temperature": 0.0}, "temperature=0.0: expected > 0"),
    "temperature_not_cached": ({"train.temperature": 3.0},
                               "temperature=3.0 is not among config.cache.temperatures"),
    "invalid_regex": ({"stages.wrappers.groups": [["(wrapper", 1.0], [".*", 0.0]]},
                      "invalid regex '(wrapper'"),
    "uncovered_params": ({"stages.wrappers.groups": [[".*wrapper.*", 1.0]]},
                         "params match no pattern"),
    "all_frozen": ({"stages.all.groups": [[".*", 0.0]]}, "every param is frozen"),
    "batch_not_divisible_by_micro": ({"train.micro_batches": 3}, "batch_size=16: expected a "
                                     "positive multiple of micro_batches=3"),
    "mesh_too_big": ({"mesh.data": 4}, "needs 4 devices, 1 available"),
    "unknown_stage": ({"stage_order": "wrappers,finetune"}, "names stage 'finetune'"),
    "bad_kd_mode": ({"train.kd_mode": "forward"}, "config.train.kd_mode='forward'"),
    "teacher_missing": ({"teacher": "/nonexistent/teacher"}, "/nonexistent/teacher/config.json"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(tmp_path, teacher_dir, name):
  path, _ = teacher_dir
  over, expected = CASES[name]
  cfg = write_config_file(tmp_path, job_config(tmp_path, path, **over))
  before = snapshot(tmp_path)
  r = run_cli("moedistill.train", f"--config={cfg}")
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
  assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_cache_of_other_seq_len_is_refused(tmp_path, teacher_dir):
  path, _ = teacher_dir
  good = write_config_file(tmp_path, job_config(tmp_path, path), "good.py")
  assert run_cli("moedistill.cache_logits", f"--config={good}").returncode == 0
  cfg = write_config_file(tmp_path, job_config(tmp_path, path, **{"data.seq_len": 32}))
  before = snapshot(tmp_path)
  r = run_cli("moedistill.train", f"--config={cfg}")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "made with different seq_len" in r.stderr.splitlines()[-1], r.stderr
  assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, teacher_dir):
  path, _ = teacher_dir
  c = job_config(tmp_path, path, **{"train.lr": 1e30, "train.clip_norm": 0.0,
                                     "train.warmup_steps": 0, "train.checkpoint_every": 1,
                                     "train.batch_size": 4})
  cfg = write_config_file(tmp_path, c)
  r = run_cli("moedistill.train", f"--config={cfg}")
  assert r.returncode == 2, r.stderr[-2000:]
  line = r.stderr.splitlines()[-1]
  assert "loss is" in line and "at stage wrappers step" in line, line
  step = int(line.split("at stage wrappers step ")[1].split()[0])
  ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert ckpts == list(range(1, step)), (ckpts, step)
