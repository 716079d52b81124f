"""Per-row rules for JSONL datasets: format detection, a fast acceptor and the detailed checks.

The rules are those of api-reference §6 (the together 1.6.0 checker, widened for tools, parallel
tool calls and reasoning as v2.5+ and the server-side docs describe them). A row is first offered
to `fast_check(fmt)`, which only says yes to the plain, common shapes (string contents, strict
user/assistant turns) without raising or allocating; everything else goes to `RowChecker`, which
returns every problem of the row as `(field, rule, detail)` tuples. The caller adds the line.

Usage:
    fmt = detect_format(row)            # "CONVERSATION", ... or None
    issues, flags = [], set()
    fmt = RowChecker(purpose, issues, flags).check(row)
"""

from __future__ import annotations

from typing import Any, Callable

# Dataset format names, as the server's validation_report spells them (api-reference §4.3).
CONVERSATION = "CONVERSATION"
INSTRUCTION = "INSTRUCTION"
GENERAL = "GENERAL"
PREFERENCE = "PREFERENCE"
TOKENIZED = "TOKENIZED"  # Parquet with input_ids
CSV = "CSV"  # eval files only
DATASET_FORMATS = frozenset({CONVERSATION, INSTRUCTION, GENERAL, PREFERENCE, TOKENIZED, CSV})

# Top-level keys that define each JSONL format, and the optional keys each one may also carry.
REQUIRED_KEYS = {
    GENERAL: ("text",),
    CONVERSATION: ("messages",),
    INSTRUCTION: ("prompt", "completion"),
    PREFERENCE: ("input", "preferred_output", "non_preferred_output"),
}
OPTIONAL_KEYS = {GENERAL: (), CONVERSATION: ("tools",), INSTRUCTION: (), PREFERENCE: ()}

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


def matching_formats(row: dict) -> list[str]:
    """Every format whose required keys are all present in the row."""
    return [fmt for fmt, keys in REQUIRED_KEYS.items() if all(k in row for k in keys)]


def detect_format(row: Any) -> str | None:
    """The one JSONL format a row has (CONVERSATION, INSTRUCTION, GENERAL, PREFERENCE), or None
    when it is not an object, matches none, or matches more than one."""
    if not isinstance(row, dict):
        return None
    found = matching_formats(row)
    return found[0] if len(found) == 1 else None


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


# ---- fast acceptor: plain rows only, no exceptions, no allocation beyond the loop ----

_TURNS = ("user", "assistant")


def _fast_conversation(row: dict) -> bool:
    msgs = row.get("messages")
    if len(row) != 1 or type(msgs) is not list:
        return False
    turn = 0
    for m in msgs:
        if type(m) is not dict or len(m) != 2 or type(m.get("content")) is not str:
            return False
        role = m.get("role")
        if role != _TURNS[turn & 1]:
            if role != "system" or m is not msgs[0]:
                return False
            continue
        turn += 1
    return turn >= 2  # at least one user + assistant pair


def _fast_instruction(row: dict) -> bool:
    return len(row) == 2 and type(row.get("prompt")) is str and type(row.get("completion")) is str


def _fast_general(row: dict) -> bool:
    text = row.get("text")
    return len(row) == 1 and type(text) is str and text != ""


def _never(row: dict) -> bool:
    return False


def fast_check(fmt: str | None) -> Callable[[dict], bool]:
    """A predicate that accepts only rows of `fmt` the detailed checks would pass with no flag
    raised; a False means "look closer", not "invalid"."""
    return {CONVERSATION: _fast_conversation, INSTRUCTION: _fast_instruction,
            GENERAL: _fast_general}.get(fmt, _never)


# ---- detailed checks ----


class RowChecker:
    """Checks one row in full, appending (field, rule, detail) to `issues` and dataset features
    to `flags`. `purpose` "eval" drops the assistant requirement and tolerates extra columns and
    rows of no known format (eval sets carry references and metadata)."""

    def __init__(self, purpose: str, issues: list[Issue], flags: set[str]) -> None:
        self.eval = purpose == "eval"
        self.issues = issues
        self.flags = flags

    def add(self, field: str | None, rule: str, detail: str) -> None:
        self.issues.append((field, rule, detail))

    def check(self, row: dict) -> str | None:
        """Check a JSON object; returns its format, or None when it has none."""
        found = matching_formats(row)
        if len(found) > 1:
            self.add(None, "ambiguous_format",
                     f"the row has the keys of both {found[0]} and {found[1]}; keep only the keys "
                     f"of one format ({self._formats_help()}).")
            return None
        if not found:
            if not self.eval:
                keys = ", ".join(map(repr, row)) or "none"
                self.add(None, "unknown_format",
                         f"no dataset format matches the keys ({keys}); use {self._formats_help()}.")
            return None
        fmt = found[0]
        allowed = REQUIRED_KEYS[fmt] + OPTIONAL_KEYS[fmt]
        for key in row:
            if key not in allowed and not self.eval:
                self.add(key, "extra_column",
                         f"the column {key!r} is not part of the {fmt} format; remove it "
                         f"(allowed: {', '.join(allowed)}).")
        if fmt == CONVERSATION:
            if "tools" in row:
                self.tools(row["tools"], "tools")
            self.conversation(row["messages"], "messages", need_assistant=not self.eval)
        elif fmt == INSTRUCTION:
            self.content(row["prompt"], "prompt", "user")
            self.content(row["completion"], "completion", "assistant")
        elif fmt == GENERAL:
            text = row["text"]
            if not isinstance(text, str) or not text:
                self.add("text", "wrong_type" if not isinstance(text, str) else "empty_text",
                         f"expected a non-empty string, found {describe(text)}. Put the sample's text here.")
        else:
            self.preference(row)
        return fmt

    @staticmethod
    def _formats_help() -> str:
        return ('"text" (GENERAL), "messages" (CONVERSATION), "prompt"+"completion" (INSTRUCTION) or '
                '"input"+"preferred_output"+"non_preferred_output" (PREFERENCE)')

    # -- conversations --

    def conversation(self, msgs: Any, path: str, need_assistant: bool) -> list[str] | None:
        """Checks a messages list; returns the roles when every message has a valid one."""
        if not isinstance(msgs, list):
            self.add(path, "wrong_type", f"expected a list of message objects, found {describe(msgs)}.")
            return None
        if not msgs:
            self.add(path, "empty_messages", "the conversation has no messages; add at least a user "
                     "and an assistant message.")
            return None
        roles: list[str] = []
        calls: list[bool] = []
        images = 0
        kinds: tuple[bool, int] | None = None  # (content is a list of parts, index of first)
        for i, m in enumerate(msgs):
            role, n_images, is_parts = self.message(m, f"{path}[{i}]")
            if role is not None:
                roles.append(role)
                calls.append(bool(m.get("tool_calls")))
            images += n_images
            if is_parts is not None:
                if kinds is None:
                    kinds = (is_parts, i)
                elif kinds[0] != is_parts:
                    self.add(f"{path}[{i}].content", "mixed_content_kinds",
                             f"{'a list of parts' if is_parts else 'a string'} here but "
                             f"{'a list of parts' if kinds[0] else 'a string'} in {path}[{kinds[1]}]; "
                             "within one sample use strings everywhere or lists of parts everywhere.")
        if images > MAX_IMAGES:
            self.add(path, "too_many_images",
                     f"{images} images in one sample; at most {MAX_IMAGES} are allowed. Split the sample.")
        if len(roles) != len(msgs):
            return None  # order checks need every role
        self.order(roles, calls, path)
        if need_assistant and "assistant" not in roles:
            self.add(path, "missing_assistant",
                     "no assistant message; add at least one assistant message to learn from.")
        return roles

    def order(self, roles: list[str], calls: list[bool], path: str) -> None:
        """System first if at all, then user; user/assistant alternate; an assistant with
        tool_calls is followed by tool messages and then an assistant. Reports the first break."""
        prev = None  # previous role; "call" for an assistant message with tool_calls
        for i, role in enumerate(roles):
            field = f"{path}[{i}].role"
            if role == "system":
                if i:
                    return self.add(field, "system_not_first", "a system message is allowed only as "
                                    "the first message; move it to the start or merge it there.")
            elif prev in (None, "system"):
                if role != "user":
                    return self.add(field, "first_not_user", f"the conversation must start with a user "
                                    f"message (after an optional system message), found {role}; "
                                    "add the user message first.")
            elif role == "tool":
                if prev not in ("call", "tool"):
                    return self.add(field, "tool_without_call", "a tool message must follow an "
                                    "assistant message with tool_calls (or another tool message); "
                                    "add the tool_calls or remove this message.")
            elif prev == "call":
                return self.add(field, "missing_tool_result", f"found {role} after an assistant "
                                "message with tool_calls; add the tool messages with the results first.")
            elif prev == "tool" and role == "user":
                return self.add(field, "role_alternation", "a user message right after tool results; "
                                "add the assistant message that answers from them.")
            elif role == prev:
                other = "assistant" if role == "user" else "user"
                return self.add(field, "role_alternation", f"two {role} messages in a row; roles must "
                                f"alternate user/assistant: merge them or add the {other} message between.")
            prev = "call" if role == "assistant" and calls[i] else role

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

    def preference(self, row: dict) -> None:
        box = row["input"]
        if not isinstance(box, dict):
            self.add("input", "wrong_type", f'expected an object {{"messages": [...]}}, found {describe(box)}.')
        else:
            for key in box:
                if key not in ("messages", "tools"):
                    self.add(f"input.{key}", "extra_field", f"unknown key {key!r} in input; keep only "
                             "messages (and tools).")
            if "tools" in box:
                self.tools(box["tools"], "input.tools")
            if "messages" not in box:
                self.add("input.messages", "missing_field", "input needs a messages list with the prompt "
                         "conversation.")
            else:
                roles = self.conversation(box["messages"], "input.messages", need_assistant=False)
                if roles and roles[-1] == "assistant":
                    self.add(f"input.messages[{len(roles) - 1}].role", "input_ends_with_assistant",
                             "the input must end before the answer being compared; remove this "
                             "assistant message or move it into the outputs.")
        for key in ("preferred_output", "non_preferred_output"):
            out = row[key]
            if not isinstance(out, list) or len(out) != 1:
                self.add(key, "output_count" if isinstance(out, list) else "wrong_type",
                         f"expected a list of exactly one assistant message, found {describe(out)}.")
                continue
            role, _, _ = self.message(out[0], f"{key}[0]")
            if role is not None and role != "assistant":
                self.add(f"{key}[0].role", "invalid_role", f'expected "assistant", found {describe(role)}.')
