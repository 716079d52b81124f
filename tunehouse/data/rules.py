"""Per-row rules for JSONL datasets: format detection and the detailed checks.

The rules are those of api-reference §6 (the together 1.6.0 checker, widened for tools, parallel
tool calls and reasoning as v2.5+ and the server-side docs describe them). A raw line is first
offered to `acceptor.plain_acceptor(fmt, purpose)`, which only says yes to the plain, common
shapes (string contents, strict user/assistant turns), checked in C by msgspec; everything else is
parsed and goes to `RowChecker`, which returns every problem of the row as `(field, rule, detail)`
tuples (per-message rules in `messages.py`). The caller adds the line.

Usage:
    fmt = detect_format(row)            # "CONVERSATION", ... or None
    issues, flags = [], set()
    fmt = RowChecker(purpose, issues, flags).check(row)
"""

from __future__ import annotations

from typing import Any

from tunehouse.data.messages import MAX_IMAGES, Issue, MessageChecks, describe

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


def matching_formats(row: dict) -> list[str]:
    """Every format whose required keys are all present in the row."""
    return [fmt for fmt, keys in REQUIRED_KEYS.items() if all(k in row for k in keys)]


def declared_tools(tools: Any) -> set[str] | None:
    """The function names a `tools` value declares, or None when it is absent or not a list."""
    if not isinstance(tools, list):
        return None
    return {t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)}


def detect_format(row: Any) -> str | None:
    """The one JSONL format a row has (CONVERSATION, INSTRUCTION, GENERAL, PREFERENCE), or None
    when it is not an object, matches none, or matches more than one."""
    if not isinstance(row, dict):
        return None
    found = matching_formats(row)
    return found[0] if len(found) == 1 else None


# ---- detailed checks ----


class RowChecker:
    """Checks one row in full, appending (field, rule, detail) to `issues` and dataset features
    to `flags`. `purpose` "eval" drops the assistant requirement and tolerates extra columns and
    rows of no known format (eval sets carry references and metadata)."""

    def __init__(self, purpose: str, issues: list[Issue], flags: set[str]) -> None:
        self.eval = purpose == "eval"
        self.m = MessageChecks(issues, flags)
        self.add = self.m.add

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
                self.m.tools(row["tools"], "tools")
            self.conversation(row["messages"], "messages", need_assistant=not self.eval,
                              tool_names=declared_tools(row.get("tools")))
        elif fmt == INSTRUCTION:
            self.m.content(row["prompt"], "prompt", "user")
            self.m.content(row["completion"], "completion", "assistant")
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

    def conversation(self, msgs: Any, path: str, need_assistant: bool,
                     tool_names: set[str] | None = None) -> list[str] | None:
        """Checks a messages list; returns the roles when every message has a valid one.
        `tool_names`: the functions the row's `tools` declare (None: no usable tools list)."""
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
            role, n_images, is_parts = self.m.message(m, f"{path}[{i}]")
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
        if not self.order(roles, calls, path):
            self.tool_results(msgs, path, tool_names)
        if need_assistant and "assistant" not in roles:
            self.add(path, "missing_assistant",
                     "no assistant message; add at least one assistant message to learn from.")
        return roles

    def order(self, roles: list[str], calls: list[bool], path: str) -> bool:
        """System first if at all, then user; user/assistant alternate; an assistant with
        tool_calls is followed by tool messages and then an assistant. Reports the first break
        (and returns True when there was one)."""
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
        return False

    def tool_results(self, msgs: list[dict], path: str, tool_names: set[str] | None) -> None:
        """Tool messages answer the calls just made: no more results than calls, and a
        `tool_call_id` names one of those calls not answered yet; every call names a declared
        tool when the row declares tools."""
        pending: list | None = None  # ids of the last call message not answered yet
        for i, m in enumerate(msgs):
            calls = m.get("tool_calls") if m.get("role") == "assistant" else None
            if isinstance(calls, list) and calls:
                pending = [c.get("id") for c in calls if isinstance(c, dict)]
                for k, c in enumerate(calls):
                    fn = c.get("function") if isinstance(c, dict) else None
                    name = fn.get("name") if isinstance(fn, dict) else None
                    if tool_names is not None and isinstance(name, str) and name not in tool_names:
                        self.add(f"{path}[{i}].tool_calls[{k}].function.name", "unknown_tool",
                                 f"the call names {name!r}, which the row's tools do not declare "
                                 f"({', '.join(sorted(tool_names)) or 'none'}); add its definition to "
                                 "tools or fix the name.")
            elif m.get("role") == "tool" and pending is not None:
                cid = m.get("tool_call_id")
                if not pending:
                    self.add(f"{path}[{i}]", "extra_tool_result", "more tool results than the "
                             "assistant message before made calls; remove this one or add its call.")
                elif isinstance(cid, str) and cid not in pending and all(isinstance(x, str) for x in pending):
                    self.add(f"{path}[{i}].tool_call_id", "unknown_tool_call_id",
                             f"{cid!r} is not the id of a call of the assistant message before that is "
                             f"still unanswered ({', '.join(map(repr, pending))}); use one of those ids.")
                    pending.pop(0)
                else:
                    pending.remove(cid if cid in pending else pending[0])


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
                self.m.tools(box["tools"], "input.tools")
            if "messages" not in box:
                self.add("input.messages", "missing_field", "input needs a messages list with the prompt "
                         "conversation.")
            else:
                roles = self.conversation(box["messages"], "input.messages", need_assistant=False,
                                          tool_names=declared_tools(box.get("tools")))
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
            role, _, _ = self.m.message(out[0], f"{key}[0]")
            if role is not None and role != "assistant":
                self.add(f"{key}[0].role", "invalid_role", f'expected "assistant", found {describe(role)}.')
