"""Two training processes (torchrun, gloo, the tiny model) against one with the same global
batch: equal per-step losses for LoRA (DDP), full weights (FSDP2) and DPO; the same checkpoint
files, weights and merged model; a 2-process checkpoint resumed by 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import chat_file, tiny_model_dir, write_jsonl  # noqa: F401  (fixtures)

from tunehouse.train.checkpoint import list_files
from tunehouse.train.config import DPOConfig, SFTConfig
from tunehouse.train.distributed import TIMEOUT_ENV
from tunehouse.train.dpo import run_dpo
from tunehouse.train.events import MemoryReporter
from tunehouse.train.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("dist_recipe.py")
# Global batch 4 in 2 micro-batches; 16 chat examples pack into 5 rows, so each epoch's last
# step has 1 row: on 2 ranks one of them runs the stand-in row with weight 0.
SFT = dict(model="tunehouse/tiny-llama", training_file="file-test", batch_size=4, gradient_accumulation_steps=2,
           learning_rate=1e-2, max_seq_length=128, random_seed=0, n_epochs=2, n_checkpoints=2)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def torchrun(tmp: Path, name: str, method: str, cfg: dict, n: int = 2, **paths) -> list[dict]:
    """Run the recipe in n processes; what each rank saw, rank order."""
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"method": method, "cfg": cfg, "output_dir": str(tmp / name),
                                **{k: str(v) for k, v in paths.items()}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "120"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           str(HELPER), str(spec)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(Path(f"{spec}.rank{r}.json").read_text()) for r in range(n)]


def one_process(tmp: Path, name: str, method: str, cfg: dict, **paths) -> tuple[Path, MemoryReporter]:
    reporter = MemoryReporter()
    recipe, config = (run_dpo, DPOConfig) if method == "dpo" else (run_sft, SFTConfig)
    final = recipe(config(**cfg), output_dir=tmp / name, reporter=reporter, bf16=False,  # as tests/dist_recipe.py
                   **{"validation_path": None, **paths})
    return final, reporter


def losses(rows, key="train_loss") -> list[float]:
    return [values[key] for _, values in rows if key in values]


def assert_two_ranks_and_rank0_alone_reported(ranks: list[dict]) -> None:
    assert [(r["rank"], r["world"], r["backend"]) for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert ranks[0]["metrics"] and ranks[0]["checkpoints"]
    assert ranks[1]["metrics"] == [] and ranks[1]["events"] == [] and ranks[1]["checkpoints"] == []
    start = ranks[0]["events"][0]
    assert start["message"] == "Training started on 2 processes (gloo)" and start["processes"] == 2


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-3) -> None:
    """Equal up to summation order: Adam divides each gradient element by its own running scale,
    so an element whose gradient is ~0 moves by up to the learning rate on a 1e-9 difference
    (measured: 4.5e-4 at most after 4 LoRA steps at lr 1e-2, weights up to 0.14)."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], atol=atol), k


def test_each_rank_takes_every_nth_row_in_as_many_micro_batches_as_the_others():
    from tunehouse.train.distributed import Dist, micro_batches

    two = [Dist(rank=r, world=2) for r in (0, 1)]
    assert micro_batches(5, 4, Dist()) == [[0, 1], [2], [3], [4]]  # one process: as always
    # 5 rows, accumulation 4 on 2 ranks: 2 micro-batches each, rank 0 rows 0, 2, 4 and rank 1 rows 1, 3
    assert [micro_batches(5, 4, d) for d in two] == [[[0, 2], [4]], [[1], [3]]]
    assert [micro_batches(5, 1, d) for d in two] == [[[0, 2, 4]], [[1, 3]]]
    # a step's last row alone: rank 1 has an empty micro-batch (it runs a stand-in with weight 0)
    assert [micro_batches(1, 2, d) for d in two] == [[[0]], [[]]]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, chat_file):  # noqa: F811
    tmp = tmp_path_factory.mktemp("lora")
    paths = dict(model_path=tiny_model_dir, training_path=chat_file)
    ranks = torchrun(tmp, "two", "sft", SFT, **paths)
    final, one = one_process(tmp, "one", "sft", SFT, **paths)
    return tmp, ranks, final, one


def test_lora_ddp_on_two_processes_gives_the_losses_of_one(lora_runs):
    _, ranks, _, one = lora_runs
    assert_two_ranks_and_rank0_alone_reported(ranks)
    two = ranks[0]["metrics"]
    assert len(two) == len(one.metric_rows) == 4
    assert losses(two) == pytest.approx(one.losses(), abs=1e-5)
    assert losses(two, "grad_norm") == pytest.approx(one.losses("grad_norm"), rel=1e-4)
    assert losses(two, "train_mean_token_accuracy") == pytest.approx(one.losses("train_mean_token_accuracy"))
    assert losses(two)[-1] < losses(two)[0]  # it learns (the numbers are not all equal by accident)


@torch.no_grad()
def test_lora_checkpoints_of_two_processes_are_those_of_one(lora_runs, tiny_model_dir):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, ranks, final_one, _ = lora_runs
    final_two = Path(ranks[0]["final"])
    (mid_step, mid_two, kind), _ = ranks[0]["checkpoints"]
    assert kind == "Intermediate"
    assert list_files(final_two) == list_files(final_one) and "merged/model.safetensors" in list_files(final_two)
    assert list_files(mid_two) == list_files(tmp / "one" / "checkpoints" / Path(mid_two).name)
    assert_same_tensors(final_two / "adapter_model.safetensors", final_one / "adapter_model.safetensors")
    ids = torch.tensor([[1, 303, 277, 201, 42, 75, 264, 2, 201, 1, 67]])
    merged = AutoModelForCausalLM.from_pretrained(final_two / "merged")(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final_two)
    assert torch.allclose(merged, adapted(input_ids=ids).logits, atol=1e-4)
    assert torch.allclose(merged, AutoModelForCausalLM.from_pretrained(final_one / "merged")(input_ids=ids).logits,
                          atol=1e-4)


def test_a_two_process_checkpoint_resumes_in_one_process(lora_runs, tiny_model_dir, chat_file):  # noqa: F811
    tmp, ranks, final_one, one = lora_runs
    (mid_step, mid_two, _), _ = ranks[0]["checkpoints"]
    final, resumed = one_process(tmp, "resumed", "sft", SFT, model_path=tiny_model_dir, training_path=chat_file,
                                 resume_from=Path(mid_two))
    assert [s for s, _ in resumed.metric_rows] == [3, 4] and mid_step == 2
    assert resumed.losses() == pytest.approx(one.losses()[2:], abs=1e-5)
    assert_same_tensors(final / "adapter_model.safetensors", final_one / "adapter_model.safetensors")


def test_full_weights_under_fsdp_give_the_losses_and_checkpoint_of_one(tmp_path, tiny_model_dir, chat_file):  # noqa: F811
    cfg = {**SFT, "lora": False, "learning_rate": 1e-3}
    paths = dict(model_path=tiny_model_dir, training_path=chat_file)
    ranks = torchrun(tmp_path, "two", "sft", cfg, **paths)
    final_one, one = one_process(tmp_path, "one", "sft", cfg, **paths)
    assert_two_ranks_and_rank0_alone_reported(ranks)
    assert losses(ranks[0]["metrics"]) == pytest.approx(one.losses(), abs=1e-5)
    assert losses(ranks[0]["metrics"], "grad_norm") == pytest.approx(one.losses("grad_norm"), rel=1e-4)
    final_two = Path(ranks[0]["final"])
    assert list_files(final_two) == list_files(final_one)  # gathered: the folder 1 process writes
    assert_same_tensors(final_two / "model.safetensors", final_one / "model.safetensors")
    # the gathered optimizer moments resume in 1 process: the rest of the run is the same
    (mid_step, mid_two, _), _ = ranks[0]["checkpoints"]
    _, resumed = one_process(tmp_path, "resumed", "sft", cfg, resume_from=Path(mid_two), **paths)
    assert resumed.losses() == pytest.approx(one.losses()[mid_step:], abs=1e-5)
    # and 1 process's checkpoint resumes on 2: the full moments cut back into shards
    mid_one = tmp_path / "one" / "checkpoints" / Path(mid_two).name
    again = torchrun(tmp_path, "resumed-two", "sft", cfg, resume_from=mid_one, **paths)
    assert losses(again[0]["metrics"]) == pytest.approx(one.losses()[mid_step:], abs=1e-5)


def say_rows(n: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"Say {WORDS[i % 8]}."}]},
             "preferred_output": [{"role": "assistant", "content": WORDS[i % 8]}],
             "non_preferred_output": [{"role": "assistant", "content": WORDS[(i + 3) % 8]}]} for i in range(n)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora-ddp", "full-fsdp"])
def test_dpo_on_two_processes_gives_the_losses_of_one(tmp_path, tiny_model_dir, lora):  # noqa: F811
    data = write_jsonl(tmp_path / "say.jsonl", say_rows(10))  # 10 pairs, batch 4: the last step has 2
    cfg = dict(model="tunehouse/tiny-llama", training_file="file-test", batch_size=4, gradient_accumulation_steps=2,
               learning_rate=1e-2 if lora else 1e-3, max_seq_length=64, random_seed=0, dpo_beta=0.5, lora=lora,
               n_evals=1)  # evaluations at steps 0 and 3 (on sampled training pairs): loss and exact KL
    paths = dict(model_path=tiny_model_dir, training_path=data)
    ranks = torchrun(tmp_path, "two", "dpo", cfg, reference_cache_dir=tmp_path / "cache", **paths)
    _, one = one_process(tmp_path, "one", "dpo", cfg, **paths)
    assert_two_ranks_and_rank0_alone_reported(ranks)
    two = ranks[0]["metrics"]
    assert losses(two)[0] == pytest.approx(0.693147, abs=1e-6)  # π = ρ at step 1: the gathered reference is right
    assert losses(two) == pytest.approx(one.losses(), abs=1e-5) and len(two) == 3 + 1  # + step 0's evaluation
    assert [s for s, v in two if "kl" in v] == [0, 3]
    assert losses(two, "valid_loss") == pytest.approx(one.losses("valid_loss"), abs=1e-5)
    assert losses(two, "kl") == pytest.approx(one.losses("kl"), abs=1e-6) and losses(two, "kl")[1] > 0
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
        assert losses(two, key) == pytest.approx(one.losses(key), rel=1e-4, abs=1e-5), key
    assert len(list((tmp_path / "cache").iterdir())) == 1  # written once, by rank 0


def test_early_stopping_on_two_processes_stops_where_one_does(tmp_path, tiny_model_dir, chat_file):  # noqa: F811
    """Validation answers that contradict the training ones: the validation loss turns up, and
    2 processes stop at the same evaluation as 1 with the best evaluation's weights (rank 0 wrote
    them, every rank read them back)."""
    from train_fixtures import QA

    answers = [a for _, a in QA]
    valid = write_jsonl(tmp_path / "valid.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answers[i - 3]}]}
        for i, (q, _) in enumerate(QA)])
    cfg = {**SFT, "batch_size": 2, "gradient_accumulation_steps": 1, "n_epochs": 6, "n_evals": 12,
           "n_checkpoints": 12, "validation_file": "file-valid", "early_stopping_enabled": True,
           "early_stopping_patience": 2}  # as tests/test_train_sft.py's early stopping
    paths = dict(model_path=tiny_model_dir, training_path=chat_file, validation_path=valid)
    ranks = torchrun(tmp_path, "two", "sft", cfg, **paths)
    _, one = one_process(tmp_path, "one", "sft", cfg, **paths)
    two = ranks[0]["metrics"]
    total = ranks[0]["events"][0]["total_steps"]
    assert [s for s, _ in two] == [s for s, _ in one.metric_rows] and two[-1][0] < total  # stopped early, same step
    # 20 steps at lr 1e-2 (the 1e-5 tests above take 3-4): last-bit differences of the sums (1 row
    # per rank here, 2 rows in one process) grow through Adam's per-element scaling; measured at
    # most 5.4e-5 relative on the train loss and 1.4e-5 on the validation loss
    assert losses(two) == pytest.approx(one.losses(), rel=2e-4)
    assert losses(two, "valid_loss") == pytest.approx(one.losses("valid_loss"), rel=1e-4)
    best, final, kind = ranks[0]["checkpoints"][-1]
    assert kind == "Final" and best == one.checkpoints[-1][0] < two[-1][0]  # the same best step, before the stop
    a, b = (load_file(Path(f) / "adapter_model.safetensors")
            for f in (final, tmp_path / "two" / "checkpoints" / f"step-{best:06d}"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the best weights, put back
