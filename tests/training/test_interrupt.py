"""Ctrl-C during training stops the run even where the interrupted code swallows the
KeyboardInterrupt (an asyncio runner inside a checkpoint save, a finalizer): the trainer's
SIGINT handler raises it and sets a flag that the next step turns into KeyboardInterrupt.
The whole command (Ctrl-C, status 130, resume) is tests/commands/test_first_hour.py."""
import os
import signal
import time
import types

import pytest

from moedistill.training.trainer import Trainer


def _trainer_state():
  return types.SimpleNamespace(interrupted=False, sigterm=False)


def test_a_swallowed_ctrl_c_stops_at_the_next_step():
  t = _trainer_state()
  old = signal.signal(signal.SIGINT, lambda *a: Trainer._on_sigint(t, *a))
  try:
    try:
      os.kill(os.getpid(), signal.SIGINT)  # delivered here, then swallowed
      time.sleep(1)  # the handler runs here at the latest
    except BaseException:  # noqa: BLE001 - what careless code does
      pass
  finally:
    signal.signal(signal.SIGINT, old)
  assert t.interrupted
  with pytest.raises(KeyboardInterrupt):
    Trainer._stop_requested(t, 7)


def test_no_ctrl_c_no_stop(monkeypatch):
  from moedistill.training import trainer
  monkeypatch.setattr(trainer.multihost_utils, "reached_preemption_sync_point", lambda g: False)
  t = _trainer_state()
  assert Trainer._stop_requested(t, 7) is False
  t.sigterm = True
  assert Trainer._stop_requested(t, 7) is True
