"""The cache on an S3-compatible object store (moto's server, started here, addressed by a
kvstore JSON spec with its endpoint): both phases and the training that reads the cache equal
a local-directory run bit for bit, and a build killed there resumes to the same arrays."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import write_config_file
from moedistill.cache_logits import build_cache
from moedistill.config import job_from_config
from moedistill.data import cache
from test_tokens import corpus_config
from test_train import _differing, reference, small  # noqa: F401 - `reference` is a fixture

pytestmark = pytest.mark.slow  # whole commands or training runs in processes

BUCKET = "moedistill-test"
CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_DEFAULT_REGION": "us-east-1"}
NAMES = ("tokens", "segment_ids", "topk_idx", "topk_logit", "lse", "done", "tokens_done")


@pytest.fixture(scope="module")
def s3():
  boto3 = pytest.importorskip("boto3")  # comes with the test extra's moto[server]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  saved = {k: os.environ.get(k) for k in CREDS}
  os.environ.update(CREDS)
  endpoint = f"http://127.0.0.1:{port}"
  client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
  try:
    for _ in range(200):
      try:
        client.create_bucket(Bucket=BUCKET)
        break
      except Exception:  # noqa: BLE001 - the server is still starting
        time.sleep(0.05)
    yield endpoint, client
  finally:
    server.kill()
    server.wait()
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def spec(endpoint, prefix):
  return json.dumps({"driver": "s3", "bucket": BUCKET, "path": prefix, "endpoint": endpoint,
                     "aws_region": "us-east-1"})


def arrays_of(path):
  meta = cache.read_metadata(path)
  arrs = cache.open_arrays(path, meta)
  return meta, {n: arrs[n].read().result() for n in NAMES}


def assert_same_cache(got_path, want_path):
  (gm, got), (wm, want) = arrays_of(got_path), arrays_of(want_path)
  assert {k: v for k, v in gm.items() if k != "stats"} == {
      k: v for k, v in wm.items() if k != "stats"}
  for n in NAMES:
    np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_s3_cache_and_training_equal_a_local_run(tmp_path, reference, s3):  # noqa: F811
  ref_tmp, ref_job, ref_export = reference
  endpoint, _ = s3
  c = small(tmp_path, ref_tmp / "teacher", **{"cache.path": spec(endpoint, "run1/")})
  job = job_from_config(c)
  from moedistill.train import train
  export = train(job, progress=False)  # both phases, both splits, then training, on S3
  for split in ("train", "eval"):
    assert_same_cache(job.cache_path(split), ref_job.cache_path(split))
  assert _differing(export, ref_export) == []


def test_killed_build_on_s3_resumes(tmp_path, teacher_dir, s3):
  endpoint, client = s3
  c, _ = corpus_config(tmp_path, teacher_dir[0], n_files=2, docs=1000, block=512)
  c.cache.rows_per_chunk = 32  # fewer, larger objects: each S3 request costs milliseconds
  local = job_from_config(c)
  want = build_cache(local, "train", progress=False)
  c.cache.path = spec(endpoint, "run2/")
  cfg = write_config_file(tmp_path, c)

  def progress():
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                             Prefix="run2/train/")
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    return sum(("/staging/" in k and k.endswith(".json")) or "/tokens_done/" in k
               or "/done/" in k for k in keys)

  target = 25
  p = subprocess.Popen([sys.executable, "-m", "moedistill.cache_logits", f"--config={cfg}",
                        "--split=train"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, **CREDS))
  while p.poll() is None and progress() < target:
    time.sleep(0.05)
  assert p.poll() is None, "finished before the kill"
  p.send_signal(signal.SIGKILL)
  p.wait()
  s3_path = job_from_config(c).cache_path("train")
  meta = cache.read_metadata(s3_path)
  assert progress() >= target and (meta is None or not meta["complete"])
  r = subprocess.run([sys.executable, "-m", "moedistill.cache_logits", f"--config={cfg}",
                      "--split=train"], capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, **CREDS))
  assert r.returncode == 0, r.stderr[-2000:]
  assert_same_cache(s3_path, want)
