"""The fast path of the JSONL check: says yes, in C where it can, to the plain rows of a format.

`plain_acceptor(fmt, purpose)` returns an `Acceptor` whose `one(line)` and `run(buf, view, pos,
stop)` accept raw lines that the detailed checks of `rules.RowChecker` would pass with no flag
raised (string contents, strict user/assistant turns, only the keys listed); a line refused here
is not invalid, it goes to the precise path (`jsonl._Lines.slow`), which names every problem.
"""

from __future__ import annotations

import io
import itertools
from collections import deque
from typing import Annotated, Callable, Literal, NamedTuple

import msgspec
import orjson

from tunehouse.data.rules import CONVERSATION, GENERAL, INSTRUCTION

# msgspec decodes a line straight into the typed shape of a plain row (string contents, only
# the keys listed, roles from a closed set) or raises; it parses JSON as strictly as orjson and
# the json module (UTF-8, escapes, control characters, trailing data) and, like them, keeps the
# last of duplicate keys (checking every occurrence), so a row it accepts is the dict the
# detailed checks would see. A conversation is first decoded into a positional shape (an
# array-like struct per position: [system,] user, assistant, user, ...), which checks the turn
# order in C too; a row that does not fit it (more turns, or the other of with/without system)
# is decoded as a list of messages and its role tuple looked up in a set. The loop over a
# chunk's lines runs inside the acceptor (`Acceptor.run`), which saves a call a line.


class _Message(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Literal["system", "user", "assistant"]
    content: str


class _Conversation(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: list[_Message]


class _System(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Literal["system"]
    content: str


class _User(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Literal["user"]
    content: str


class _Assistant(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: Literal["assistant"]
    content: str


# Turns a positional shape spells out. Each optional position costs a little on every row (the
# struct has a slot per position): on 60 MB of the bench's rows (3-9 messages, already in
# memory) the positional decode takes 1.14 us a row with 8 pairs, 1.21 with 16, 1.31 with 32,
# against 1.55 for the list decode plus the role-tuple lookup. Longer rows take that path, at
# the speed all rows had before.
_PAIRS = 8


def _positional(system: bool) -> type:
    """A plain conversation typed position by position: [system,] user, assistant, then up to
    _PAIRS - 1 more user/assistant pairs, the last assistant optional (trailing positions may be
    left out, extra ones are refused). Accepts exactly the role sequences `plain_turns` accepts,
    up to its length."""
    fields: list = [("system", _System)] if system else []
    fields += [("user1", _User), ("assistant1", _Assistant)]
    fields += [(f"{role}{i}", kind, None) for i in range(2, _PAIRS + 1)
               for role, kind in (("user", _User), ("assistant", _Assistant))]
    turns = msgspec.defstruct("Turns", fields, array_like=True, forbid_unknown_fields=True,
                              gc=False)
    return msgspec.defstruct("PlainConversation", [("messages", turns)], forbid_unknown_fields=True,
                             gc=False)


_WITH_SYSTEM, _WITHOUT_SYSTEM = _positional(True), _positional(False)


class _Instruction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    prompt: str
    completion: str


class _General(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    text: Annotated[str, msgspec.Meta(min_length=1)]


_TURNS = ("user", "assistant")
_ROLE_CACHE = 4096  # distinct role sequences an acceptor remembers


def plain_turns(roles: tuple[str, ...]) -> bool:
    """Roles of a plain conversation: an optional system message first, then user and assistant
    alternating from user, with at least one of each."""
    turn = 0
    for i, role in enumerate(roles):
        if role != _TURNS[turn & 1]:
            if role != "system" or i:
                return False
            continue
        turn += 1
    return turn >= 2


class Acceptor(NamedTuple):
    """The fast path for one format. `one(line)`: is this raw line (no newline) a plain row?
    `run(buf, view, pos, stop)`: accepts the newline-ended lines of buf[pos:stop] while they are
    plain and returns (start of the first line refused, or stop; lines accepted); `view` is
    memoryview(buf). Refused means "look closer" (the precise path decides), not "invalid"."""

    one: Callable[[bytes], bool]
    run: Callable[[bytearray, memoryview, int, int], tuple[int, int]]


# Lines a decode must accept in a row before `run` hands it the rest of a chunk at once
# (`_decode_lines`); a refused line goes back to line-by-line, so a file whose rows often need a
# closer look (or change shape) never pays for splitting a chunk it leaves after a few lines.
_SETTLED = 64


def _decode_lines(decode: Callable, view: memoryview, pos: int, stop: int) -> tuple[int, int, int]:
    """Decodes each newline-ended line of view[pos:stop] on its own, with no Python bytecode a
    line: BytesIO.readlines finds the newlines (memchr) and map/deque drive the decode. 4% less
    CPU than the find/slice/decode loop on the 1 GB bench file (1.057 -> 1.017 s, 1 process), the
    copy of the chunk into BytesIO included. A line keeps its newline, which msgspec reads as
    trailing white space, as it reads a line's own. Returns (start of the first line refused or
    stop, lines accepted, that line's newline or stop)."""
    lines = io.BytesIO(view[pos:stop]).readlines()
    done = itertools.count()  # zip advances it once per line decoded
    try:
        deque(zip(map(decode, lines), done), maxlen=0)
    except msgspec.MsgspecError:
        k = next(done)
        pos += sum(map(len, itertools.islice(lines, k)))
        return pos, k, pos + len(lines[k]) - 1
    return stop, len(lines), stop


def _conversation_acceptor() -> Acceptor:
    by_list = msgspec.json.Decoder(_Conversation).decode
    with_system = msgspec.json.Decoder(_WITH_SYSTEM).decode
    without_system = msgspec.json.Decoder(_WITHOUT_SYSTEM).decode
    plain: set[tuple[str, ...]] = set()  # role sequences found plain
    state = [without_system]  # the decode `run` tries first: fits the last plain row refused by it
    settled = [0]  # lines that decode accepted since it last refused one

    def one(line: bytes) -> bool:
        if state[0] is not by_list:
            try:
                state[0](line)
                return True
            except msgspec.MsgspecError:
                pass
        try:
            roles = tuple([m.role for m in by_list(line).messages])
        except msgspec.MsgspecError:
            return False
        if roles not in plain:
            if not plain_turns(roles):
                return False
            if len(plain) < _ROLE_CACHE:
                plain.add(roles)
        system = roles[0] == "system"
        if len(roles) > 2 * _PAIRS + system:  # longer than the positional shapes
            state[0] = by_list
        else:
            state[0] = with_system if system else without_system
        return True

    def run(buf: bytearray, view: memoryview, pos: int, stop: int) -> tuple[int, int]:
        find, n = buf.find, 0
        while pos < stop:
            decode = state[0]
            if decode is by_list:
                try:
                    while pos < stop:
                        end = find(b"\n", pos, stop)
                        if tuple([m.role for m in decode(view[pos:end]).messages]) not in plain:
                            break
                        n += 1
                        pos = end + 1
                except msgspec.MsgspecError:
                    pass
            elif settled[0] >= _SETTLED:  # the hot path of the whole check: one typed decode a line
                pos, accepted, end = _decode_lines(decode, view, pos, stop)
                n += accepted
                if pos < stop:
                    settled[0] = 0
            else:
                n0 = n
                try:
                    while pos < stop:
                        end = find(b"\n", pos, stop)
                        decode(view[pos:end])
                        n += 1
                        pos = end + 1
                    settled[0] += n - n0
                except msgspec.MsgspecError:
                    settled[0] = 0
            if pos >= stop:
                break
            if not one(view[pos:end]):  # another shape, a role sequence not seen yet, or not plain
                break
            n += 1
            pos = end + 1
        return pos, n

    return Acceptor(one, run)


def _shape_acceptor(shape: type) -> Acceptor:
    decode = msgspec.json.Decoder(shape).decode
    settled = [0]  # lines accepted since the last one refused

    def one(line: bytes) -> bool:
        try:
            decode(line)
        except msgspec.MsgspecError:
            return False
        return True

    def run(buf: bytearray, view: memoryview, pos: int, stop: int) -> tuple[int, int]:
        if settled[0] >= _SETTLED:
            pos, n, _ = _decode_lines(decode, view, pos, stop)
            if pos < stop:
                settled[0] = 0
            return pos, n
        find, n = buf.find, 0
        try:
            while pos < stop:
                end = find(b"\n", pos, stop)
                decode(view[pos:end])
                n += 1
                pos = end + 1
            settled[0] += n
        except msgspec.MsgspecError:
            settled[0] = 0
        return pos, n

    return Acceptor(one, run)


def _one_by_one(one: Callable[[bytes], bool]) -> Acceptor:
    def run(buf: bytearray, view: memoryview, pos: int, stop: int) -> tuple[int, int]:
        find, n = buf.find, 0
        while pos < stop:
            end = find(b"\n", pos, stop)
            if not one(view[pos:end]):
                break
            n += 1
            pos = end + 1
        return pos, n

    return Acceptor(one, run)


def _any_object(line: bytes) -> bool:
    try:
        return type(orjson.loads(line)) is dict
    except ValueError:
        return False


def _never(line: bytes) -> bool:
    return False


def plain_acceptor(fmt: str | None, purpose: str) -> Acceptor:
    """The fast path for rows of `fmt`: it accepts only rows that the detailed checks would
    pass with no flag raised. For purpose batch-api every JSON object passes (the API checks
    the bodies); with no format known yet nothing does."""
    if purpose == "batch-api":
        return _one_by_one(_any_object)
    if fmt == CONVERSATION:
        return _conversation_acceptor()
    if fmt == INSTRUCTION:
        return _shape_acceptor(_Instruction)
    if fmt == GENERAL:
        return _shape_acceptor(_General)
    return _one_by_one(_never)
