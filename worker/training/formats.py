"""Training-data formats: what one line of a tunepool JSONL file may hold, and how a file is validated.

Two formats, chosen per file by its first valid example; every example in a file has the same format:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight": 0|1}, ...]}``.
  ``weight`` is optional, allowed on assistant messages only, default 1; 0 keeps a turn as context only.
- prompt/completion: ``{"prompt": str, "completion": str}``; the completion is trained, the prompt is not.

This module imports only the standard library: the API imports it to validate an upload while it streams
in, and the trainer imports it to read the same file, so both agree on what "valid" means. Validation
reports every bad line at once, with its line number, because fixing a dataset one error per upload is
miserable.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_LINE_BYTES: int = 4 * 1024 * 1024
CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"

_FORMAT_LABELS = {CHAT: "chat", PROMPT_COMPLETION: "prompt/completion"}
_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = ("role", "content", "weight")
_PC_KEYS = ("prompt", "completion")
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16 = "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
# Files people upload by mistake, known by their first bytes: one whole-file error beats one per line.
_BAD_STARTS = (
    (b"\xff\xfe", _UTF16),
    (b"\xfe\xff", _UTF16),
    (b"\x1f\x8b", "looks like a gzip file; upload uncompressed JSONL"),
    (b"PK\x03\x04", "looks like a zip file; upload uncompressed JSONL"),
    (b"\x28\xb5\x2f\xfd", "looks like a zstd file; upload uncompressed JSONL"),
    (b"\xfd7zX", "looks like an xz file; upload uncompressed JSONL"),
    (b"PAR1", "looks like a Parquet file; convert it to JSONL (one JSON object per line)"),
)
_UTF16_NO_BOM = "the file looks like UTF-16 (every other byte is NUL); save it as UTF-8"
_BINARY = "looks like a binary file (NUL bytes in its first bytes), not JSONL text; upload UTF-8 JSONL"
_HEAD_BYTES = 4  # enough bytes to recognise every entry of _BAD_STARTS and the UTF-8 BOM
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Message:
    """One chat turn. ``weight`` is 1 when the turn is trained (assistant only), else 0."""

    role: str
    content: str
    weight: int


@dataclass(frozen=True)
class ChatExample:
    """A chat example; ``line`` is its 1-based line number in the file."""

    messages: tuple[Message, ...]
    line: int


@dataclass(frozen=True)
class PromptCompletionExample:
    """A prompt/completion example; ``line`` is its 1-based line number in the file."""

    prompt: str
    completion: str
    line: int


Example = ChatExample | PromptCompletionExample


@dataclass(frozen=True)
class LineError:
    """One problem: ``line`` is 1-based, or 0 for a whole-file problem (empty file, UTF-16, gzip...)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"file: {self.reason}" if self.line == 0 else f"line {self.line}: {self.reason}"


@dataclass
class ValidationReport:
    """The outcome of validating one file: its format, counts, and the first ``max_errors`` errors."""

    format: str | None  # CHAT, PROMPT_COMPLETION, or None when no line was a valid example
    n_examples: int  # valid examples
    n_lines: int  # lines seen, blank ones included
    errors: list[LineError] = field(default_factory=list)  # the first max_errors, in line order
    n_errors: int = 0  # all errors, which may be more than len(errors)

    @property
    def ok(self) -> bool:
        """True when the file can be trained on: no errors and at least one example."""
        return self.n_errors == 0 and self.n_examples > 0

    def summary(self, limit: int = 20) -> str:
        """Human-readable text listing up to ``limit`` errors, for API error messages and job events."""
        if self.n_errors == 0:
            if not self.ok:
                return "training data has no examples"
            plural = "s" if self.n_examples != 1 else ""
            return f"{self.n_examples} valid {_FORMAT_LABELS.get(self.format or '', '')} example{plural}"
        shown = self.errors[:limit]
        if shown and shown[0].line == 0:
            head = "training data is invalid:"
        else:
            head = f"{self.n_errors} bad line{'s' if self.n_errors != 1 else ''} in training data:"
        text = [head, *(str(error) for error in shown)]
        if self.n_errors > len(shown):
            text.append(f"... and {self.n_errors - len(shown)} more")
        return "\n".join(text)


class DataFormatError(ValueError):
    """Raised by read_examples for an invalid file; carries the report; str() is report.summary()."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report


def parse_example(obj: object, line: int) -> Example:
    """Turn one decoded JSON value into an example; raise ValueError(reason) if it is not a valid one."""
    if not isinstance(obj, dict):
        if isinstance(obj, list):
            raise ValueError("line is a JSON array; expected one JSON object per line (JSONL)")
        raise ValueError(f"line is a JSON {_json_type(obj)}; expected a JSON object")
    pc_keys = [key for key in _PC_KEYS if key in obj]
    if "messages" in obj and pc_keys:
        raise ValueError(
            f"mixes chat ('messages') and prompt/completion ({', '.join(map(repr, pc_keys))}) keys; "
            "use one format per line"
        )
    if "messages" in obj:
        return _parse_chat(obj, line)
    if pc_keys:
        return _parse_prompt_completion(obj, line)
    expected = "expected 'messages' (chat) or 'prompt' and 'completion'"
    if not obj:
        raise ValueError(f"empty object; {expected}")
    key = next(iter(obj))
    raise ValueError(f"unknown key {_short(key)}{_did_you_mean(key, ('messages', *_PC_KEYS))}; {expected}")


def _parse_chat(obj: dict[Any, object], line: int) -> ChatExample:
    _reject_unknown_keys(obj, ("messages",), "", "a chat example has only 'messages'")
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise ValueError(f"messages: expected a list of messages, got a JSON {_json_type(raw)}")
    if not raw:
        raise ValueError("messages: empty list; expected at least a user and an assistant message")
    messages = tuple(_parse_message(message, f"messages[{i}]") for i, message in enumerate(raw))
    _check_turn_order(messages)
    if not any(message.role == "assistant" for message in messages):
        raise ValueError("messages: no assistant message; there is nothing to train on")
    if not any(message.weight for message in messages):
        raise ValueError("messages: every assistant message has weight 0; there is nothing to train on")
    return ChatExample(messages, line)


def _parse_message(raw: object, where: str) -> Message:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a message object, got a JSON {_json_type(raw)}")
    _reject_unknown_keys(raw, _MESSAGE_KEYS, where, "a message has role, content and optional weight")
    if "role" not in raw:
        raise ValueError(f"{where}: missing 'role'")
    role = raw["role"]
    if not isinstance(role, str):
        raise ValueError(f"{where}.role: expected a string, got a JSON {_json_type(role)}")
    if role not in _ROLES:
        expected = "(expected system, user or assistant)"
        raise ValueError(f"{where}.role: unknown role {_short(role)}{_did_you_mean(role, _ROLES)} {expected}")
    if "content" not in raw:
        raise ValueError(f"{where}: missing 'content'")
    content = raw["content"]
    if not isinstance(content, str):
        raise ValueError(f"{where}.content: expected a string, got a JSON {_json_type(content)}")
    if not content.strip():
        raise ValueError(f"{where}.content: {'empty' if not content else 'whitespace-only'} {role} message")
    weight = 1 if role == "assistant" else 0  # system and user turns are never trained
    if "weight" in raw:
        if role != "assistant":
            raise ValueError(f"{where}.weight: only assistant messages may have a weight (this is {role!r})")
        raw_weight = raw["weight"]
        # type() rather than isinstance(): JSON true decodes to a bool, which is an int subclass.
        if type(raw_weight) is not int or raw_weight not in (0, 1):
            raise ValueError(f"{where}.weight: must be the integer 0 or 1, got {_show(raw_weight)}")
        weight = raw_weight
    return Message(role, content, weight)


def _check_turn_order(messages: tuple[Message, ...]) -> None:
    # Chat templates assume system? then user/assistant alternating, starting with user; many raise or
    # silently mangle anything else, so reject it here where the user can still see the line number.
    for i, message in enumerate(messages):
        where = f"messages[{i}].role"
        if message.role == "system":
            if i > 0:
                raise ValueError(f"{where}: a system message is only allowed as the first message")
            continue
        previous = messages[i - 1].role if i > 0 else "system"
        if previous == "system" and message.role != "user":
            raise ValueError(
                f"{where}: the conversation must start with a user message, not {message.role!r}"
            )
        if previous == message.role:
            raise ValueError(
                f"{where}: two {message.role!r} messages in a row (messages[{i - 1}] and messages[{i}]); "
                "user and assistant must alternate"
            )


def _parse_prompt_completion(obj: dict[Any, object], line: int) -> PromptCompletionExample:
    _reject_unknown_keys(obj, _PC_KEYS, "", "a prompt/completion example has only 'prompt' and 'completion'")
    for key in _PC_KEYS:
        if key not in obj:
            raise ValueError(f"missing {key!r} (a prompt/completion example needs both)")
        if not isinstance(obj[key], str):
            raise ValueError(f"{key}: expected a string, got a JSON {_json_type(obj[key])}")
    prompt, completion = str(obj["prompt"]), str(obj["completion"])
    if not completion.strip():  # an empty prompt is fine (unconditional text); an empty completion is not
        raise ValueError("completion: empty or whitespace-only; there is nothing to train on")
    return PromptCompletionExample(prompt, completion, line)


def _reject_unknown_keys(obj: dict[Any, object], allowed: tuple[str, ...], where: str, hint: str) -> None:
    for key in obj:
        if key not in allowed:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}unknown key {_short(key)}{_did_you_mean(key, allowed)} ({hint})")


def _did_you_mean(word: object, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6) if isinstance(word, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _json_type(value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _clip(text: str, limit: int = 40) -> str:
    # Values are echoed back in error messages; a 1 MB "role" must not make a 1 MB message.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object) -> str:
    return _clip(repr(value))


def _show(value: object) -> str:
    # A decoded JSON scalar as JSON spells it (true, "1", 0.5), so the user recognises their file's text.
    return f"a JSON {_json_type(value)}" if isinstance(value, (dict, list)) else _clip(json.dumps(value))


def _too_long(size: int, max_line_bytes: int) -> str:
    return f"line is too long ({size:,} bytes; the limit is {max_line_bytes:,})"


def _bad_start(head: bytes) -> str | None:
    """Why a file's first bytes show it is no UTF-8 JSONL at all (one whole-file error), or None."""
    for magic, reason in _BAD_STARTS:
        if head.startswith(magic):
            return reason
    # UTF-16 without a byte-order mark still shows: JSONL starts with ASCII ('{', '[', whitespace),
    # which UTF-16 spells as the character and a NUL byte (RFC 4627, section 3). Otherwise every line
    # would be reported as "contains NUL bytes", and nothing would say which encoding was expected.
    if len(head) == 4 and head[0] and head[2] and head[1] == head[3] == 0:  # UTF-16-LE
        return _UTF16_NO_BOM
    if len(head) == 4 and head[1] and head[3] and head[0] == head[2] == 0:  # UTF-16-BE
        return _UTF16_NO_BOM
    if b"\x00" in head:  # no JSONL text holds a raw NUL byte (JSON escapes it as \u0000)
        return _BINARY
    return None


def _check_line(raw: bytes, line: int, max_line_bytes: int) -> Example | str | None:
    """One line without its line ending -> its example, the reason it is bad, or None when blank."""
    if len(raw) > max_line_bytes:
        return _too_long(len(raw), max_line_bytes)
    if not raw or raw.isspace():  # blank lines (and the usual newline at the end of a file) are fine
        return None
    if b"\x00" in raw:
        return "contains NUL bytes; is this a binary file?"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[: exc.start].decode("utf-8")) + 1  # everything before the bad byte decodes
        return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})"
    if text.startswith("\ufeff"):  # json's own message says "decode using utf-8-sig", no help to a user
        return "line starts with a UTF-8 byte-order mark (were files concatenated?)"
    try:
        return parse_example(json.loads(text), line)
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} (column {exc.colno})"
        if text.strip() in ("[", "{"):
            reason += "; the file looks like pretty-printed JSON, expected one JSON object per line (JSONL)"
        elif exc.msg == "Extra data":
            reason += "; more than one JSON value on the line?"
        return reason
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as exc:  # parse_example's reasons, and json's rare non-decode errors (huge ints)
        return str(exc)


class StreamingValidator:
    """Validate a JSONL file fed as arbitrary byte chunks; memory stays near ``max_line_bytes``.

    Lines are split on b"\\n" (a trailing b"\\r" is dropped). An over-long line is discarded as it
    streams and reported once; the lines after it keep their true line numbers.
    """

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_errors: int = 100,
        keep_examples: bool = False,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_errors = max_errors
        self.keep_examples = keep_examples
        self.examples: list[Example] = []  # filled only when keep_examples
        self._report = ValidationReport(format=None, n_examples=0, n_lines=0)
        self._format_line = 0  # the line whose example set the file's format
        self._head = b""  # the first bytes, held until the BOM / file-type check can run
        self._started = False  # the head has been checked
        self._rejected = False  # a whole-file error was reported; the remaining bytes are ignored
        self._partial = bytearray()  # the current line so far, before its newline arrives
        self._overlong = 0  # > 0: bytes of an over-long line seen so far (being discarded, not kept)
        self._n_bytes = 0  # content bytes seen (after a UTF-8 BOM), to tell an empty file apart
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        """Validate the next bytes of the file; chunk boundaries may fall anywhere, even inside a line."""
        if self._finished:
            raise RuntimeError("feed() called after finish()")
        if self._rejected or not chunk:
            return
        if not self._started:
            self._head += chunk
            if len(self._head) < _HEAD_BYTES:
                return
            chunk = self._check_head()
        self._split_lines(chunk)

    def finish(self) -> ValidationReport:
        """Validate a last line without a trailing newline, add whole-file errors, return the report."""
        if self._finished:
            return self._report
        self._finished = True
        if not self._started:  # a file shorter than _HEAD_BYTES
            self._split_lines(self._check_head())
        if self._overlong:
            self._line_too_long(self._overlong)
        elif self._partial:
            self._process_line(bytes(self._partial))
        self._partial.clear()
        if self._report.n_errors == 0 and self._report.n_examples == 0:
            blank = "no examples: the file has only blank lines"
            self._error(0, "the file is empty" if self._n_bytes == 0 else blank)
        return self._report

    def _check_head(self) -> bytes:
        self._started = True
        head, self._head = self._head, b""
        reason = _bad_start(head[:_HEAD_BYTES])  # only these bytes: the verdict must not depend on chunking
        if reason is not None:
            self._rejected = True
            self._error(0, reason)
            return b""
        return head.removeprefix(_UTF8_BOM)  # Windows editors add it; it is not part of line 1's JSON

    def _split_lines(self, chunk: bytes) -> None:
        if self._rejected:
            return
        self._n_bytes += len(chunk)
        limit = self.max_line_bytes + 1  # + 1 for the b"\r" of a CRLF ending; _process_line is exact
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            size = self._overlong + len(self._partial) + end - start
            if size > limit:  # checked before slicing, so a huge line in one chunk is never copied
                self._line_too_long(size)
            elif self._partial:
                self._partial += chunk[start:end]
                self._process_line(bytes(self._partial))
            else:
                self._process_line(chunk[start:end])
            self._partial.clear()
            self._overlong = 0
            start = end + 1
        tail = len(chunk) - start
        if self._overlong or len(self._partial) + tail > limit:
            self._overlong += len(self._partial) + tail  # count the bytes, drop them
            self._partial.clear()
        else:
            self._partial += chunk[start:]

    def _line_too_long(self, size: int) -> None:
        self._report.n_lines += 1
        self._error(self._report.n_lines, _too_long(size, self.max_line_bytes))

    def _process_line(self, raw: bytes) -> None:
        self._report.n_lines += 1
        line = self._report.n_lines
        result = _check_line(raw.removesuffix(b"\r"), line, self.max_line_bytes)
        if result is None:
            return
        if isinstance(result, str):
            self._error(line, result)
            return
        kind = CHAT if isinstance(result, ChatExample) else PROMPT_COMPLETION
        if self._report.format is None:
            self._report.format, self._format_line = kind, line
        elif kind != self._report.format:
            label, file_label = _FORMAT_LABELS[kind], _FORMAT_LABELS[self._report.format]
            where = f"(line {self._format_line} set the format)"
            self._error(line, f"{label} example in a {file_label} file {where}")
            return
        self._report.n_examples += 1
        if self.keep_examples:
            self.examples.append(result)

    def _error(self, line: int, reason: str) -> None:
        self._report.n_errors += 1
        if len(self._report.errors) < self.max_errors:
            self._report.errors.append(LineError(line, reason))


def _validate_path(path: str | os.PathLike[str], validator: StreamingValidator) -> ValidationReport:
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            validator.feed(chunk)
    return validator.finish()


def validate_file(
    path: str | os.PathLike[str], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_errors: int = 100
) -> ValidationReport:
    """Validate a JSONL file on disk; the report lists the first ``max_errors`` errors and counts all."""
    return _validate_path(path, StreamingValidator(max_line_bytes=max_line_bytes, max_errors=max_errors))


def read_examples(
    path: str | os.PathLike[str], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[str, list[Example]]:
    """Return (format, examples) of a JSONL file; raise DataFormatError (up to 1000 errors) if invalid."""
    validator = StreamingValidator(max_line_bytes=max_line_bytes, max_errors=1000, keep_examples=True)
    report = _validate_path(path, validator)
    if not report.ok or report.format is None:
        raise DataFormatError(report)
    return report.format, validator.examples
