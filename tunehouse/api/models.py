"""/models routes: the models a caller can run (base models and its completed fine-tunes)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tunehouse.api.deps import CurrentCaller, RegistryDep, SessionDep
from tunehouse.api.inference_schemas import is_together_v1
from tunehouse.serve import models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(caller: CurrentCaller, session: SessionDep, registry: RegistryDep, request: Request):
    """Base models and the caller's completed fine-tunes.

    Shape rule: the together 1.x SDK asserts that the body is a bare JSON array, and the openai
    SDK builds its page from an object's `data` key (openai 3.57 raises AttributeError on a bare
    array), so no one body satisfies both. A client whose `User-Agent` starts with `Together/v1`
    (the 1.x SDK and CLI) gets the array (api-reference §8); every other client (openai SDK, curl,
    …) gets OpenAI's `{"object": "list", "data": [...]}`. The items are the same in both."""
    items = models.list_models(session, registry, caller.owner)
    return items if is_together_v1(request.headers.get("user-agent")) else {"object": "list", "data": items}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, caller: CurrentCaller, session: SessionDep, registry: RegistryDep):
    """One model by name; names hold slashes (`owner/base-suffix-id`), hence the path converter.
    Unknown and other owners' models are the same 404."""
    return models.model_object(session, registry, caller.owner, model_id)
