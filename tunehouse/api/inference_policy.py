"""Every field of an inference request is acted on, accepted as metadata, or refused — never
silently ignored. This module is the one table for the last two (the fields acted on are the ones
the request models in `inference_schemas.py` declare):

- METADATA: accepted whatever their value; they change nothing a client can observe in the output
  (ids for abuse tracking, tags for stored completions, prompt-cache hints), so refusing them would
  only break clients that send them by habit.
- REFUSED: a feature tunehouse does not have. A 400 names the field (`param`) and says what to
  send instead. A value that asks for nothing beyond what tunehouse does (e.g. `store: false`,
  `modalities: ["text"]`) is accepted.
- Anything else that no request model declares is refused as unrecognized, as OpenAI does.

`null` is always accepted: the SDKs send it for "the default".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunehouse.errors import InvalidInput

METADATA: dict[str, str] = {
    "user": "an end-user id for the provider's abuse tracking",
    "safety_identifier": "an end-user id for the provider's abuse tracking",
    "metadata": "tags for stored completions (tunehouse stores none)",
    "prompt_cache_key": "a prompt-cache routing hint: the output is the same without it",
    "prompt_cache_retention": "a prompt-cache lifetime: the output is the same without it",
    "prompt_cache_options": "prompt-cache breakpoints: the output is the same without them",
}

def _never(_value: Any, _body: Any) -> bool:
    return False


def _equals(*ok: Any) -> Callable[[Any, Any], bool]:
    return lambda value, _body: value in ok


_VLLM = "vLLM's structured-output extension is not read here: use `response_format` ({})."

# field → (values that need nothing tunehouse lacks, what to do instead)
REFUSED: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "audio": (_never, "This server generates text only: remove `audio`."),
    "modalities": (lambda v, _: v == ["text"], "This server generates text only: send `modalities: [\"text\"]` "
                                               "or leave it out."),
    "prediction": (_never, "Predicted outputs are not supported: remove `prediction` (the answer does not "
                           "depend on it, only the speed would)."),
    "web_search_options": (_never, "Web search is not available: remove `web_search_options`, and put any "
                                   "search results you have in the messages."),
    "functions": (lambda v, _: v == [], "`functions` is deprecated: describe each function as "
                                        "`tools: [{\"type\": \"function\", \"function\": {...}}]`."),
    "function_call": (_equals("none"), "`function_call` is deprecated: use `tool_choice`."),
    "reasoning_effort": (_equals("none"), "These models do not reason before answering: remove "
                                          "`reasoning_effort`."),
    "reasoning": (lambda v, _: isinstance(v, dict) and not v.get("enabled"),
                  "These models do not reason before answering: remove `reasoning` (or send enabled: false)."),
    "verbosity": (_never, "`verbosity` is not supported: ask for the length you want in the messages, and "
                          "bound it with `max_tokens`."),
    "moderation": (_never, "No moderation model runs here: remove `moderation`, and moderate the output "
                           "with a model of your own."),
    "safety_model": (_never, "No moderation model runs here: remove `safety_model`, and moderate the output "
                             "with a model of your own."),
    "compliance": (_never, "tunehouse has no compliance modes (its deployment decides what it complies with): "
                           "remove `compliance`."),
    "store": (_equals(False), "Completions are not stored here: leave `store` out or send false."),
    "service_tier": (_equals("auto", "default"), "There is one service tier: leave `service_tier` out or send "
                                                 "\"auto\"."),
    "suffix": (_equals(""), "Fill-in-the-middle is not supported: remove `suffix` and put the text in `prompt`."),
    "best_of": (lambda v, body: v == (getattr(body, "n", None) or 1),
                "best_of is not supported (only best_of = n): ask for `n` choices with `logprobs` and pick the "
                "best yourself."),
    "guided_json": (_never, _VLLM.format("type json_schema")),
    "guided_regex": (_never, _VLLM.format("type regex")),
    "guided_choice": (_never, _VLLM.format("a json_schema with an enum")),
    "guided_grammar": (_never, _VLLM.format("json_schema or regex; no free grammars")),
    "guided_decoding_backend": (_never, _VLLM.format("the backend is llguidance")),
    "structured_outputs": (_never, _VLLM.format("json_schema or regex")),
}


def check(extra: dict[str, Any], body: Any) -> None:
    """Refuse the first undeclared field of a request (`extra`: name → value) that asks for
    something tunehouse does not do. Raises InvalidInput naming it."""
    for name, value in extra.items():
        if value is None or name in METADATA:
            continue
        if name in REFUSED:
            fine, advice = REFUSED[name]
            if not fine(value, body):
                raise InvalidInput(f"`{name}` is not supported. {advice}", param=name, code="unsupported_parameter")
            continue
        raise InvalidInput(f"Unrecognized request argument supplied: {name}. Remove it: tunehouse refuses fields "
                           "it would otherwise ignore.", param=name, code="unknown_parameter")
