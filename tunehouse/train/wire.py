"""The training configs on the wire: a `POST /v1/fine-tunes` body read into config values, and a
config written back as the body (the job echo; the CLI's request). Generated from the fields'
`wire` declarations in `train/config.py`, so neither side lists a hyperparameter by hand.

The body nests some fields as the together SDKs do (api-reference §5.2):
`lr_scheduler.lr_scheduler_args.min_lr_ratio`, `training_type.lora_r`,
`training_method.dpo_beta`, … and `training_type.type` carries `lora` as "Lora" / "Full".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from tunehouse.train.config import CONFIGS, TrainConfig

Problem = tuple[str, str]  # (wire path of the field, message saying what to change)


def wire_path(f: dataclasses.Field) -> str:
    return f.metadata["wire"] or f.name


def hyperparameters(cls: type[TrainConfig]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _encode(name: str, value: Any) -> Any:
    return ("Lora" if value else "Full") if name == "lora" else value


def _decode(name: str, value: Any) -> Any:
    """Wire spellings the SDKs and older clients send → the config's value (checked by the config)."""
    if name == "lora" and isinstance(value, str) and value.lower() in ("lora", "full"):
        return value.lower() == "lora"
    if name == "train_on_inputs" and value in ("true", "false"):
        return value == "true"
    return value


def _paths() -> dict[str, tuple[str, str]]:
    """wire path (and alias) → (method, field name) over every config."""
    out: dict[str, tuple[str, str]] = {}
    for method, cls in CONFIGS.items():
        for f in hyperparameters(cls):
            for path in (wire_path(f), f.metadata["alias"]):
                if path and path not in out:
                    out[path] = (method, f.name)
    return out


PATHS = _paths()
FIELD_PATHS = {name: path for path, (_, name) in reversed(PATHS.items())}  # each field's own path, not its alias


def _containers(paths) -> set[str]:
    return {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}


def _leaves(body: dict, containers: set[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in body.items():
        path = prefix + str(key)
        if path in containers and isinstance(value, dict):
            yield from _leaves(value, containers, path + ".")
        else:
            yield path, value


def from_request(body: dict, method: str, request_paths: frozenset[str]) -> tuple[dict, dict, list[Problem]]:
    """Split a create body into (config values given, request-level fields, problems).

    A null means "not given" (the default applies). A field of another method, a LoRA field on a
    Full job, or a path nobody reads is a problem: nothing is accepted and ignored."""
    cls, values, request, problems = CONFIGS[method], {}, {}, []
    own = {f.name: wire_path(f) for f in hyperparameters(cls)}
    containers = _containers(set(PATHS) | request_paths)
    for path, value in _leaves(body, containers):
        if value is None:
            continue
        if path in request_paths:
            request[path] = value
        elif path in containers:
            problems.append((path, f"{path} must be an object, got {value!r}."))
        elif path not in PATHS:
            problems.append((path, f"{path} is not a field of the fine-tuning API; remove it "
                                   "(see `tunehouse fine-tuning create --help` for the fields)."))
        elif PATHS[path][1] not in own:
            owner = PATHS[path][0]
            problems.append((path, f"{path} applies to training_method {owner} only; this job is {method}."))
        else:
            name = PATHS[path][1]
            if name not in values or path == own[name]:  # the field's own path wins over its alias
                values[name] = _decode(name, value)
    lora_given = sorted(n for n in values if n.startswith("lora_"))
    if values.get("lora") is False and lora_given:
        problems.append(("training_type", f"training_type.type is Full, which trains no adapter: remove "
                                          f"{', '.join(lora_given)} or use type Lora."))
    elif lora_given and "lora" not in values:
        values["lora"] = True  # LoRA fields alone ask for LoRA
    return values, request, problems


def to_request(values: dict, method: str) -> dict:
    """Flat config values (of either method) → the nested create body (the CLI's request)."""
    out: dict = {}
    for name, value in values.items():
        _put(out, FIELD_PATHS[name], _encode(name, value))
    if "training_type" in out and "type" not in out["training_type"]:  # LoRA fields alone: LoRA, as the SDKs say
        out["training_type"] = {"type": "Lora", **out["training_type"]}
    if method != "sft" or "training_method" in out:
        out.setdefault("training_method", {})["method"] = method
    return out


def to_wire(cfg: TrainConfig, method: str) -> dict:
    """A config as the job echo shows it: every field but secrets, in its nested place."""
    values = {f.name: getattr(cfg, f.name) for f in hyperparameters(type(cfg)) if not f.metadata["secret"]}
    out = to_request(values, method)
    out.setdefault("training_method", {})["method"] = method
    if not cfg.lora:  # a Full job has no adapter shape (the v1 SDK's FullTrainingType)
        out["training_type"] = {"type": "Full"}
    if cfg.lr_scheduler_type != "cosine":  # cycles mean nothing to a linear decay
        out["lr_scheduler"]["lr_scheduler_args"].pop("num_cycles")
    return out


def _put(out: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        out = out.setdefault(key, {})
    out[leaf] = value
