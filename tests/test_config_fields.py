"""One name per hyperparameter: the create schema (flattened as the SDK flattens it) covers
exactly the fields of the training config."""

from __future__ import annotations

import dataclasses

from tunehouse.api.schemas import FineTuneCreate, LrScheduler, LrSchedulerArgs, TrainingMethod, TrainingType
from tunehouse.train.config import SFTConfig

# Wire names that differ from the flat SDK argument names the config uses (api-reference §5.2).
WIRE_TO_CONFIG = {"lr_scheduler_type": "lr_scheduler_type", "min_lr_ratio": "min_lr_ratio",
                  "num_cycles": "scheduler_num_cycles", "type": "lora", "wandb_key": "wandb_api_key"}
NOT_TRAINING = {"from_checkpoint", "from_hf_model", "hf_model_revision", "hf_api_token", "hf_output_repo_name",
                "suffix", "multimodal_params", "method", "dpo_beta",
                "dpo_normalize_logratios_by_length", "dpo_reference_free", "rpo_alpha", "simpo_gamma"}


def test_create_schema_fields_equal_config_fields():
    wire = set()
    for model in (FineTuneCreate, LrScheduler, LrSchedulerArgs, TrainingType, TrainingMethod):
        wire |= {n for n, f in model.model_fields.items() if f.annotation not in (LrScheduler | None,
                 TrainingType | None, TrainingMethod | None, LrSchedulerArgs | None)}
    mapped = {WIRE_TO_CONFIG.get(n, n) for n in wire - NOT_TRAINING}
    assert mapped == {f.name for f in dataclasses.fields(SFTConfig)}
