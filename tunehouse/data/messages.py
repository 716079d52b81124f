"""Checks of single messages and their parts: role, content (text and image parts), weight,
reasoning, tool calls and tool definitions. `MessageChecks` appends (field, rule, detail) issues
and records dataset features (weights, tools, images...) as validation_report flags."""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset(
    {"role", "content", "weight", "tool_calls", "tool_call_id", "name", "reasoning",
     "reasoning_content"}
)
IMAGE_PREFIXES = ("data:image/jpeg;base64,", "data:image/png;base64,", "data:image/webp;base64,")
MAX_IMAGE_BYTES = 10 * 2**20  # decoded; same limit as the together SDK
MAX_IMAGE_URL_CHARS = len(IMAGE_PREFIXES[0]) + 4 * MAX_IMAGE_BYTES // 3
MAX_IMAGES = 10  # per message and per sample

# Flags of the server's validation_report (api-reference §4.3) that row checks can raise.
FLAG_WEIGHTS = "dataset_has_message_weights"
FLAG_PARALLEL_TOOL_CALLS = "dataset_has_parallel_tool_calls"
FLAG_REASONING = "dataset_has_reasoning"
FLAG_TOOLS = "dataset_has_tools"
FLAG_MULTIMODAL = "dataset_is_multimodal"

Issue = tuple[str | None, str, str]  # (field path, rule id, detail sentence)


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def describe(value: Any) -> str:
    """A short phrase for a wrong value, for messages: 'a number (42)', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f'a string ("{value[:40]}{"…" if len(value) > 40 else ""}")' if value else "an empty string"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    return f"an object with keys {', '.join(map(str, list(value)[:6]))}" if value else "an empty object"



class MessageChecks:
    """Per-message rules; `RowChecker` (rules.py) drives them over conversations and outputs."""

    def __init__(self, issues: list[Issue], flags: set[str]) -> None:
        self.issues = issues
        self.flags = flags

    def add(self, field: str | None, rule: str, detail: str) -> None:
        self.issues.append((field, rule, detail))

    def message(self, m: Any, path: str) -> tuple[str | None, int, bool | None]:
        """Checks one message; returns (valid role or None, images, content is parts or None)."""
        if not isinstance(m, dict):
            self.add(path, "wrong_type", f"expected a message object with role and content, found {describe(m)}.")
            return None, 0, None
        for key in m:
            if key not in MESSAGE_KEYS:
                self.add(f"{path}.{key}", "extra_field", f"unknown message key {key!r}; remove it "
                         f"(allowed: {', '.join(sorted(MESSAGE_KEYS))}).")
        role = m.get("role")
        if "role" not in m:
            self.add(f"{path}.role", "missing_field", f"the message has no role; add one of {', '.join(ROLES)}.")
            role = None
        elif not isinstance(role, str) or role not in ROLES:
            self.add(f"{path}.role", "invalid_role" if isinstance(role, str) else "wrong_type",
                     f"expected one of {', '.join(ROLES)}, found {describe(role)}.")
            role = None
        weight = self.weight(m, path)
        for key in ("reasoning", "reasoning_content"):
            if key in m:
                self.flags.add(FLAG_REASONING)
                if not isinstance(m[key], str):
                    self.add(f"{path}.{key}", "wrong_type", f"expected a string, found {describe(m[key])}.")
                if role not in ("assistant", None):
                    self.add(f"{path}.{key}", "misplaced_field", f"{key} is allowed only on assistant "
                             f"messages, found it on a {role} message; move it or remove it.")
        for key in ("name", "tool_call_id"):
            if key in m and not isinstance(m[key], str):
                self.add(f"{path}.{key}", "wrong_type", f"expected a string, found {describe(m[key])}.")
        has_calls = "tool_calls" in m and m["tool_calls"] is not None
        if has_calls:
            if role not in ("assistant", None):
                self.add(f"{path}.tool_calls", "misplaced_field", "tool_calls are allowed only on "
                         f"assistant messages, found them on a {role} message.")
            self.tool_calls(m["tool_calls"], f"{path}.tool_calls")
        content = m.get("content")
        if content is None:
            if role == "assistant" and not has_calls:
                self.add(f"{path}.content", "missing_content",
                         "an assistant message needs content or tool_calls; add the reply text.")
            elif role not in ("assistant", None):
                self.add(f"{path}.content", "missing_content",
                         f"a {role} message needs content; add the message text.")
            return role, 0, None
        images = self.content(content, f"{path}.content", role or "user")
        if images and weight:
            self.add(f"{path}.weight", "image_weight", "a message with images cannot be trained on; "
                     "set weight to 0 or remove it.")
        return role, images, isinstance(content, list)

    def weight(self, m: dict, path: str) -> int | None:
        if "weight" not in m:
            return None
        self.flags.add(FLAG_WEIGHTS)
        w = m["weight"]
        if isinstance(w, bool) or (isinstance(w, int) and w not in (0, 1)):
            self.add(f"{path}.weight", "invalid_weight", f"expected 0 or 1, found {describe(w)}; use the "
                     "integer 1 to train on this message or 0 to skip it.")
            return None
        if not isinstance(w, int):
            self.add(f"{path}.weight", "wrong_type", f"expected the integer 0 or 1, found {describe(w)}.")
            return None
        return w

    def content(self, value: Any, path: str, role: str) -> int:
        """A string or a list of text/image_url parts; returns the number of images."""
        if isinstance(value, str):
            return 0
        if not isinstance(value, list):
            self.add(path, "wrong_type", f"expected a string or a list of content parts, found "
                     f"{describe(value)}. Change it to the message text.")
            return 0
        images = 0
        for j, part in enumerate(value):
            p = f"{path}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(part, dict):
                self.add(p, "wrong_type", f'expected a part object like {{"type": "text", "text": "..."}}, '
                         f"found {describe(part)}.")
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    self.add(f"{p}.text", "wrong_type" if "text" in part else "missing_field",
                             f"a text part needs a string text, found {describe(part.get('text'))}.")
            elif kind == "image_url":
                images += self.image(part, p, role)
            else:
                self.add(f"{p}.type", "invalid_value", f'expected the part type "text" or "image_url", '
                         f"found {describe(kind)}.")
        if images:
            self.flags.add(FLAG_MULTIMODAL)
        if images > MAX_IMAGES:
            self.add(path, "too_many_images", f"{images} images in one message; at most {MAX_IMAGES} "
                     "are allowed.")
        return images

    def image(self, part: dict, p: str, role: str) -> int:
        if role != "user":
            self.add(p, "image_not_user", f"images are allowed only in user messages (and prompts), "
                     f"found one in a {role} message; move or remove it.")
            return 0
        box = part.get("image_url")
        url = box.get("url") if isinstance(box, dict) else None
        if not isinstance(box, dict) or not isinstance(url, str):
            where = f"{p}.image_url" + (".url" if isinstance(box, dict) else "")
            self.add(where, "wrong_type", 'expected {"image_url": {"url": "data:image/png;base64,..."}}, '
                     f"found {describe(url if isinstance(box, dict) else box)}.")
            return 0
        if not url.startswith(IMAGE_PREFIXES):
            self.add(f"{p}.image_url.url", "invalid_image_url", f"expected a base64 data URL of a JPEG, "
                     f"PNG or WEBP image (data:image/png;base64,...), found {describe(url)}; embed the "
                     "image instead of linking it.")
            return 0
        if len(url) > MAX_IMAGE_URL_CHARS:
            self.add(f"{p}.image_url.url", "image_too_large", f"the image is about "
                     f"{len(url) * 3 // 4 / 2**20:.1f} MB; the limit is 10 MB. Shrink or recompress it.")
            return 0
        return 1

    def tool_calls(self, calls: Any, path: str) -> None:
        if not isinstance(calls, list) or not calls:
            self.add(path, "wrong_type", f"expected a non-empty list of tool calls, found {describe(calls)}.")
            return
        self.flags.add(FLAG_TOOLS)
        if len(calls) > 1:
            self.flags.add(FLAG_PARALLEL_TOOL_CALLS)
        for k, call in enumerate(calls):
            self.function_object(call, f"{path}[{k}]", {"id": str}, {"name": str, "arguments": str},
                                 '{"id": "call_1", "type": "function", "function": {"name": "...", '
                                 '"arguments": "{...}"}}')
            fn = call.get("function") if isinstance(call, dict) else None
            args = fn.get("arguments") if isinstance(fn, dict) else None
            if isinstance(args, str) and not _json_object(args):
                self.add(f"{path}[{k}].function.arguments", "invalid_arguments",
                         f"expected a JSON object serialised as a string, found {describe(args)}; write "
                         'the arguments like "{\\"city\\": \\"Paris\\"}" ("{}" for none).')

    def tools(self, tools: Any, path: str) -> None:
        if not isinstance(tools, list):
            self.add(path, "wrong_type", f"expected a list of tool definitions, found {describe(tools)}.")
            return
        self.flags.add(FLAG_TOOLS)
        for k, tool in enumerate(tools):
            self.function_object(tool, f"{path}[{k}]", {}, {"name": str},
                                 '{"type": "function", "function": {"name": "...", "description": '
                                 '"...", "parameters": {...}}}')
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict):
                for key, kind, word in (("description", str, "a string"), ("parameters", dict, "an object")):
                    if key in fn and not isinstance(fn[key], kind):
                        self.add(f"{path}[{k}].function.{key}", "wrong_type",
                                 f"expected {word}, found {describe(fn[key])}.")

    def function_object(self, obj: Any, path: str, outer: dict, inner: dict, example: str) -> None:
        """Shared shape of tool calls and tool definitions: {type: "function", function: {...}}."""
        if not isinstance(obj, dict):
            self.add(path, "wrong_type", f"expected an object like {example}, found {describe(obj)}.")
            return
        if obj.get("type") != "function":
            self.add(f"{path}.type", "invalid_value" if "type" in obj else "missing_field",
                     f'expected "function", found {describe(obj.get("type"))}.')
        fn = obj.get("function")
        if not isinstance(fn, dict):
            self.add(f"{path}.function", "wrong_type" if "function" in obj else "missing_field",
                     f"expected an object with {', '.join(inner)}, found {describe(fn)}.")
            fn = {}
        for where, keys in ((obj, outer), (fn, inner)):
            prefix = path if where is obj else f"{path}.function"
            for key, kind in keys.items():
                if not isinstance(where.get(key), kind):
                    self.add(f"{prefix}.{key}", "wrong_type" if key in where else "missing_field",
                             f"expected a string, found {describe(where.get(key))}"
                             + (" (serialise the arguments as a JSON string)." if key == "arguments" else "."))

    # -- preference pairs --
