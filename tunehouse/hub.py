"""The Hugging Face hub, where the server can reach it: `from_hf_model` weights in, and
`hf_output_repo_name` uploads out. The hub is `HF_ENDPOINT` (default huggingface.co); nothing
here runs unless a request names a hub repository, and a hub the server cannot reach is a
create-time refusal that says what to do instead, never a silent substitution.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.errors import InvalidInput
from tunehouse.models.registry import Registry

TIMEOUT_S = 5.0


def _unreachable(what: str, exc: Exception, fix: str) -> InvalidInput:
    from huggingface_hub import constants

    return InvalidInput(f"{what}: this server cannot reach the Hugging Face hub at {constants.ENDPOINT} "
                        f"({type(exc).__name__}). {fix}", param=what.split(" ", 1)[0], code="hub_unreachable")


def _offline(exc: Exception) -> bool:
    """A transport failure or offline mode. By class name: huggingface_hub 2.x raises the
    TransportError of its own vendored httpx (`httpx2`), not httpx's."""
    return any(c.__name__ in ("TransportError", "OfflineModeIsEnabled") for c in type(exc).__mro__)


def resolve_hf_model(registry: Registry, s: Session, model: str, ref: str, revision: str | None,
                     token: str | None) -> str:
    """Where `from_hf_model` weights are read: a registry model's name (each worker finds its own
    copy), a server folder (absolute), or a hub repo id that exists at `revision`. Raises
    InvalidInput otherwise."""
    known = {m.name for m in registry.list(s)}
    folder = Path(ref).expanduser()
    if ref in known:
        _check_same_architecture(registry, s, model, Path(registry.path(ref, s)), ref)
        return ref
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise InvalidInput(f"from_hf_model {ref!r} is a folder without config.json: point at a Hugging Face "
                               "model folder.", param="from_hf_model")
        source = str(folder.resolve())
    else:
        _check_hub_repo(ref, revision, token)
        return ref
    _check_same_architecture(registry, s, model, Path(source), ref)
    return source


def _check_hub_repo(repo: str, revision: str | None, token: str | None) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    fix = ("Download the model where the hub is reachable, copy its folder to this server and pass the folder "
           "as from_hf_model (or add it with `tunehouse models add NAME FOLDER`).")
    try:
        HfApi(token=token or False).model_info(repo, revision=revision, timeout=TIMEOUT_S)
    except RevisionNotFoundError:
        raise InvalidInput(f"hf_model_revision {revision!r}: {repo} has no such revision.",
                           param="hf_model_revision") from None
    except GatedRepoError:
        raise InvalidInput(f"from_hf_model {repo!r} is gated: pass an hf_api_token with access to it.",
                           param="hf_api_token") from None
    except RepositoryNotFoundError:
        raise InvalidInput(f"from_hf_model {repo!r}: no such model on the hub (or it is private: pass "
                           "hf_api_token).", param="from_hf_model") from None
    except Exception as exc:
        if _offline(exc):
            raise _unreachable(f"from_hf_model {repo!r}", exc, fix) from None
        raise


def _check_same_architecture(registry: Registry, s: Session, model: str, folder: Path, ref: str) -> None:
    """A base model's limits and chat template are applied to these weights: the two must be the same kind."""
    if not registry.is_materialised(model):
        return
    theirs, ours = _arch(folder), _arch(Path(registry.path(model, s)))
    if theirs and ours and theirs != ours:
        raise InvalidInput(f"from_hf_model {ref!r} is a {theirs[0]} model (hidden size {theirs[1]}) but model "
                           f"{model!r} is a {ours[0]} (hidden size {ours[1]}): give the base model it was "
                           "fine-tuned from as model.", param="from_hf_model")


def _arch(folder: Path) -> tuple | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("model_type"), cfg.get("hidden_size")


def fetch_weights(repo: str, revision: str | None, token: str | None, cache: Path) -> Path:
    """A hub repo's files in the model cache (the worker side of `from_hf_model`)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, token=token or False, cache_dir=cache / "hub",
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def check_push_target(repo: str, token: str | None) -> None:
    """`hf_output_repo_name` can be honoured: a repo id, a token, a reachable hub that knows the token."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(repo, str) or repo.count("/") != 1:
        raise InvalidInput(f"hf_output_repo_name must be NAMESPACE/NAME; got {repo!r}.", param="hf_output_repo_name")
    if not token:
        raise InvalidInput("hf_output_repo_name needs hf_api_token: a Hugging Face token with write access to "
                           f"{repo}.", param="hf_api_token")
    try:
        HfApi(token=token).whoami()
    except HfHubHTTPError as exc:
        raise InvalidInput(f"hf_output_repo_name {repo!r}: the hub refused hf_api_token ({exc.response.status_code}"
                           "); give a token with write access.", param="hf_api_token") from None
    except Exception as exc:
        if _offline(exc):
            raise _unreachable(f"hf_output_repo_name {repo!r}", exc, "Leave hf_output_repo_name out and download "
                               "the output with `tunehouse fine-tuning download`, then push it from a machine that "
                               "reaches the hub.") from None
        raise


def push_folder(folder: Path, repo: str, token: str, message: str) -> str:
    """Upload a model folder to `repo` (created private if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, private=True, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
    return f"{api.endpoint}/{repo}"
