"""Runs one recipe in every process torchrun starts, for tests/test_train_distributed.py:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_recipe.py SPEC.json

SPEC (JSON): method ("sft" | "dpo"), cfg (config fields), model_path, training_path, output_dir,
optional resume_from, validation_path and reference_cache_dir. Each rank writes SPEC.rank<r>.json with the world
size and rank it saw inside (so a test can prove the ranks existed) and what its reporter got:
rank 0 the real metrics, the others nothing (their reporter is a null one).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from tunehouse.train import distributed
from tunehouse.train.events import MemoryReporter


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    d = distributed.setup()
    reporter = MemoryReporter()
    paths = {k: Path(spec[k]) if spec.get(k) else None for k in ("model_path", "training_path", "output_dir",
                                                                   "resume_from", "validation_path")}
    common = dict(reporter=reporter, bf16=False, **paths)  # fp32: N processes must give 1's losses to 1e-5
    if spec["method"] == "dpo":
        from tunehouse.train.config import DPOConfig
        from tunehouse.train.dpo import run_dpo

        cache = Path(spec["reference_cache_dir"]) if spec.get("reference_cache_dir") else None
        final = run_dpo(DPOConfig(**spec["cfg"]), reference_cache_dir=cache, **common)
    else:
        from tunehouse.train.config import SFTConfig
        from tunehouse.train.sft import run_sft

        final = run_sft(SFTConfig(**spec["cfg"]), **common)
    seen = {"rank": d.rank, "world": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None, "final": str(final),
            "metrics": reporter.metric_rows, "events": reporter.events,
            "checkpoints": [[s, str(p), k] for s, p, k in reporter.checkpoints]}
    Path(f"{spec_path}.rank{d.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
