"""W&B logging when a key is given: run offline (WANDB_MODE=offline, nothing leaves the machine)
and check the run recorded the step metrics."""

from __future__ import annotations

import pytest

from train_fixtures import chat_file, tiny_model_dir  # noqa: F401  (fixtures)
from tunehouse.train.config import SFTConfig
from tunehouse.train.events import MemoryReporter
from tunehouse.train.sft import run_sft

wandb = pytest.importorskip("wandb")


def test_metrics_go_to_an_offline_wandb_run(tmp_path, monkeypatch, tiny_model_dir, chat_file):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = SFTConfig(model="tunehouse/tiny-llama", training_file="file-x", batch_size=4, max_seq_length=128,
                    learning_rate=1e-2, wandb_api_key="x" * 40, wandb_project_name="tunehouse-test",
                    wandb_name="offline-run")
    reporter = MemoryReporter()
    run_sft(cfg, model_path=tiny_model_dir, training_path=chat_file, validation_path=None,
            output_dir=tmp_path / "out", reporter=reporter)
    assert "WANDB_INIT" in reporter.event_types()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline runs keep their history in the run's protobuf log; the metric names are in it.
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"train_loss" in log and b"grad_norm" in log and b"tunehouse-test" in log
