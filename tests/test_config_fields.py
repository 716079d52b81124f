"""One definition per hyperparameter: every field of SFTConfig and DPOConfig has a wire path, a
`--field-name` flag and a place in the job echo, and a non-default value sent through the raw
API or through the CLI comes back unchanged in the job. Unknown, misplaced and other-method
fields are refused with a 400 that names them."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import typer
from together import Together
from typer.testing import CliRunner

from jobs_support import write_chat
from test_api_dpo import write_pairs
from tunehouse import cli
from tunehouse.train.config import CONFIGS, DPOConfig, SFTConfig
from tunehouse.train.wire import from_request, to_request, to_wire, wire_path
from tunehouse.job_requests import REQUEST_PATHS

TINY = "tunehouse/tiny-llama"

# Two valid value sets per method, together setting every field to something other than its
# default (the cosine / LoRA fields in one, linear / Full in the other), so an ignored field shows.
COMMON_A = dict(n_epochs=2, n_checkpoints=2, n_evals=3, batch_size=4, gradient_accumulation_steps=2,
                learning_rate=3e-4, lr_scheduler_type="cosine", min_lr_ratio=0.1, scheduler_num_cycles=0.75,
                warmup_ratio=0.2, max_grad_norm=0.5, weight_decay=0.01, lora=True, lora_r=4, lora_alpha=12,
                lora_dropout=0.05, lora_trainable_modules="q_proj,v_proj", max_seq_length=256, packing=False,
                random_seed=7, wandb_api_key="wk-secret-123", wandb_base_url="http://127.0.0.1:9/wandb",
                wandb_project_name="proj", wandb_name="run", wandb_entity="team", early_stopping_enabled=True,
                early_stopping_patience=1, early_stopping_min_delta=0.01, early_stopping_warmup_evals=0)
COMMON_B = dict(COMMON_A, lr_scheduler_type="linear", lora=False, early_stopping_enabled=False, n_evals=1)
for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_trainable_modules", "scheduler_num_cycles"):
    del COMMON_B[name]
VALUES = {
    "sft": [dict(COMMON_A, train_on_inputs=True), dict(COMMON_B, train_on_inputs=False)],
    "dpo": [dict(COMMON_A, dpo_beta=0.3, dpo_normalize_logratios_by_length=True, rpo_alpha=0.5),
            dict(COMMON_B, dpo_beta=0.2, dpo_reference_free=True, simpo_gamma=0.5)],
}
FILE_FIELDS = {"model", "training_file", "validation_file"}


def _non_default_coverage(method: str) -> set[str]:
    cls = CONFIGS[method]
    return {f.name for f in dataclasses.fields(cls) for values in VALUES[method]
            if f.name in values and values[f.name] != f.default}


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_value_sets_cover_every_field(method):
    """Guard for the tests below: each field has a non-default value in some set (a new field
    without one fails here, not silently)."""
    names = {f.name for f in dataclasses.fields(CONFIGS[method])} - FILE_FIELDS
    assert names - _non_default_coverage(method) == set()


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_every_field_has_a_wire_path_a_flag_and_an_echo(method):
    create = typer.main.get_command(cli.app).commands["fine-tuning"].commands["create"]
    flags = {opt for p in create.params for opt in [*p.opts, *p.secondary_opts]}
    for values in VALUES[method]:
        cfg = CONFIGS[method](model=TINY, training_file="file-t", validation_file="file-v", **values)
        echo = to_wire(cfg, method)
        back, request, problems = from_request(echo, method, REQUEST_PATHS)
        assert problems == [] and request == {"training_method.method": method}
        expected = {k: v for k, v in cfg.to_dict().items() if k != "wandb_api_key"}
        if not cfg.lora:  # a Full job's echo carries no adapter shape
            expected = {k: v for k, v in expected.items() if not k.startswith("lora_")}
        if cfg.lr_scheduler_type == "linear":
            expected.pop("scheduler_num_cycles")
        assert back == expected
        assert "wk-secret-123" not in repr(echo)
    for f in dataclasses.fields(CONFIGS[method]):
        assert f"--{f.name.replace('_', '-')}" in flags, f.name
        assert wire_path(f) in (f.name, f.metadata["wire"])


@pytest.fixture
def files(live, tmp_path):
    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    chat = c.files.upload(write_chat(tmp_path / "chat.jsonl", 8)).id
    pairs = c.files.upload(write_pairs(tmp_path / "pairs.jsonl", 8), check=False).id
    return {"sft": chat, "dpo": pairs}


def _assert_echo(job: dict, method: str, values: dict):
    back, _, problems = from_request({k: v for k, v in job.items() if k in {p.split(".")[0] for p in
                                      _echo_paths(method)}}, method, REQUEST_PATHS)
    assert problems == []
    for name, value in values.items():
        if name == "wandb_api_key":
            assert "wk-secret-123" not in repr(job)
        else:
            assert back[name] == value, (name, back.get(name), value)


def _echo_paths(method: str) -> set[str]:
    return {wire_path(f) for f in dataclasses.fields(CONFIGS[method])} | {"training_method.method"}


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_raw_api_round_trip(live, files, method):
    for values in VALUES[method]:
        body = to_request(values, method) | {"model": TINY, "training_file": files[method],
                                              "validation_file": files[method]}
        r = httpx.post(f"{live.url}/v1/fine-tunes", json=body, headers={"Authorization": f"Bearer {live.key}"})
        assert r.status_code == 200, r.text
        _assert_echo(r.json(), method, values)


def _flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool) and name != "train_on_inputs":
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return out


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_cli_flags_round_trip(live, files, method):
    for values in VALUES[method]:
        args = ["ft", "create", "-t", files[method], "-v", files[method], "-m", TINY, "--training-method", method,
                "-y", "--json", "--base-url", live.url, "--api-key", live.key, *_flags(values)]
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 0, res.output
        import json

        _assert_echo(json.loads(res.stdout), method, values)


def test_sft_and_dpo_share_declarations():
    """The shared fields are declared once (on TrainConfig), so their defaults cannot drift."""
    sft = {f.name: f for f in dataclasses.fields(SFTConfig)}
    dpo = {f.name: f for f in dataclasses.fields(DPOConfig)}
    for name in set(sft) & set(dpo):
        assert sft[name] is dpo[name] or (sft[name].default, sft[name].metadata) == (dpo[name].default,
                                                                                     dpo[name].metadata)


@pytest.mark.parametrize("body, param, words", [
    ({"learning_rate": 1e-4, "nonsense_field": 1}, "nonsense_field", "not a field of the fine-tuning API"),
    ({"training_type": {"type": "Lora", "lora_rank": 4}}, "training_type.lora_rank", "not a field"),
    ({"training_method": {"method": "sft", "dpo_beta": 0.2}}, "training_method.dpo_beta",
     "applies to training_method dpo only"),
    ({"training_type": {"type": "Full", "lora_r": 4}}, "training_type", "Full, which trains no adapter"),
    ({"training_type": {"type": "Lora", "lora_alpha": 8.5}}, "training_type.lora_alpha", "an integer ≥ 1"),
    ({"training_type": {"type": "Lora", "lora_trainable_modules": "q_proj,qq_proj"}},
     "training_type.lora_trainable_modules", "unknown: qq_proj"),
    ({"n_checkpoints": 1000000}, "n_checkpoints", "≤ 20"),
    ({"n_evals": 1000, "validation_file": "SAME"}, "n_evals", "≤ 100"),
    ({"random_seed": 2**64}, "random_seed", "[0, 9223372036854775807]"),
    ({"training_type": {"type": "Lora", "lora_r": 128}}, "training_type.lora_r", "≤ 64"),
    ({"multimodal_params": {"train_vision": True}}, "multimodal_params.train_vision", "no vision support"),
    ({"hf_model_revision": "main"}, "hf_model_revision", "applies to from_hf_model"),
    ({"training_method": {"method": "ppo"}}, "training_method.method", "'sft' or 'dpo'"),
])
def test_refused_fields_name_themselves(live, files, body, param, words):
    if body.get("validation_file") == "SAME":
        body["validation_file"] = files["sft"]
    r = httpx.post(f"{live.url}/v1/fine-tunes", json={"model": TINY, "training_file": files["sft"], **body},
                   headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_lora_alpha_defaults_to_twice_the_rank(live, files):
    r = httpx.post(f"{live.url}/v1/fine-tunes", json={"model": TINY, "training_file": files["sft"],
                                                     "training_type": {"type": "Lora", "lora_r": 16}},
                   headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 200, r.text
    assert r.json()["training_type"] == {"type": "Lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                         "lora_trainable_modules": "all-linear"}


def test_image_dataset_refused_for_a_model_without_vision(live):
    from conftest import DATA

    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    images = c.files.upload(DATA / "good" / "chat_multimodal.jsonl", check=False)
    assert images.processing_status == "COMPLETED"
    r = httpx.post(f"{live.url}/v1/fine-tunes", json={"model": TINY, "training_file": images.id},
                   headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "training_file" and "no vision support, and file" in err["message"]


def test_limits_of_an_unknown_model_say_how_to_add_it(live):
    for name in ("org/not-a-model", "not-a-model"):
        r = httpx.get(f"{live.url}/v1/fine-tunes/models/limits", params={"model_name": name},
                      headers={"Authorization": f"Bearer {live.key}"})
        assert r.status_code == 404
        message = r.json()["error"]["message"]
        assert f"Unknown model {name!r}" in message and "tunehouse models add" in message
        assert "from_checkpoint" not in message


def test_batch_size_max_is_the_cpu_cap_here(live, files):
    r = httpx.post(f"{live.url}/v1/fine-tunes", json={"model": TINY, "training_file": files["sft"]},
                   headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 200 and r.json()["batch_size"] == 8  # CPU_MAX_BATCH, an int as the v1 SDK reads it


# The SDKs' create() takes the config's names as flat arguments, except these (which the SDK
# derives itself: dpo_reference_free from simpo_gamma).
SDK_MISSING = {"v3": {"dpo_reference_free"}, "v1": {"dpo_reference_free", "wandb_entity", "random_seed",
                                                       "early_stopping_enabled", "early_stopping_patience",
                                                       "early_stopping_min_delta", "early_stopping_warmup_evals",
                                                       "gradient_accumulation_steps", "max_seq_length", "packing"}}


def _sdk_args(values: dict, line: str) -> dict:
    return {k: v for k, v in values.items() if k not in SDK_MISSING[line]}


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_v3_sdk_round_trip(live, files, method):
    """Every argument the together 3.x SDK's fine_tuning.create sends arrives and is echoed."""
    import inspect

    c = Together(base_url=live.url, api_key=live.key, max_retries=0)
    sdk_params = set(inspect.signature(c.fine_tuning.create).parameters)
    names = {f.name for f in dataclasses.fields(CONFIGS[method])} - FILE_FIELDS
    assert names - sdk_params == SDK_MISSING["v3"] & names  # the SDK's names are the config's names
    for values in VALUES[method]:
        args = _sdk_args(values, "v3")
        job = c.fine_tuning.create(training_file=files[method], validation_file=files[method], model=TINY,
                                   training_method=method, **args)
        _assert_echo(c.fine_tuning.retrieve(job.id).model_dump(mode="json"), method, args)


def test_v1_sdk_round_trip(live, files, v1_python):
    """The together 1.x SDK's create() arguments (fewer than 3.x's) arrive and are echoed."""
    import json

    from test_api_files_v1_and_clis import run_v1

    for method in ("sft", "dpo"):
        for values in VALUES[method]:
            args = _sdk_args(values, "v1")
            res = run_v1(v1_python, live, f"""
                c = Together()
                j = c.fine_tuning.create(training_file={files[method]!r}, validation_file={files[method]!r},
                                         model={TINY!r}, training_method={method!r}, **{args!r})
                print(json.dumps(c.fine_tuning.retrieve(j.id).model_dump(mode="json", by_alias=True)))
            """)
            echoed = {k: v for k, v in args.items() if k != "wandb_api_key"}
            back, _, _ = from_request({k: v for k, v in res.items() if v is not None}, method, REQUEST_PATHS)
            seen = {k for k in echoed if k in back}  # v1's FinetuneResponse keeps only the fields it declares
            assert {k: back[k] for k in seen} == {k: echoed[k] for k in seen}
            assert len(seen) >= 15, sorted(set(echoed) - seen)
            assert json.dumps(res).find("wk-secret-123") < 0
