"""Tests for worker/training/formats.py: every bad line is reported with its line number and a reason."""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from worker.training.formats import (
    CHAT,
    DEFAULT_MAX_LINE_BYTES,
    PROMPT_COMPLETION,
    ChatExample,
    DataFormatError,
    LineError,
    Message,
    PromptCompletionExample,
    StreamingValidator,
    ValidationReport,
    parse_example,
    read_examples,
    validate_file,
)

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


def chat_line(*messages: Any, **extra: Any) -> str:
    return json.dumps({"messages": list(messages), **extra})


def pc_line(prompt: Any = "2+2=", completion: Any = "4") -> str:
    return json.dumps({"prompt": prompt, "completion": completion})


VALID_CHAT = chat_line(USER, ASSISTANT)
VALID_PC = pc_line()


def jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def validate(data: bytes, **kwargs: Any) -> ValidationReport:
    validator = StreamingValidator(**kwargs)
    validator.feed(data)
    return validator.finish()


def only_error(data: bytes, **kwargs: Any) -> LineError:
    report = validate(data, **kwargs)
    assert report.n_errors == 1, report.summary()
    assert len(report.errors) == 1
    assert not report.ok
    return report.errors[0]


def weighted(weight: Any) -> dict[str, Any]:
    return {**ASSISTANT, "weight": weight}


# Each bad chat line goes at line 3 of a chat file, after two good lines.
CHAT_CASES = [
    pytest.param('{"messages": [}', "not valid JSON: Expecting value (column 15)", id="not-json"),
    pytest.param('{"messages": []', "not valid JSON: Expecting ',' delimiter (column 16)", id="not-json-2"),
    pytest.param(VALID_CHAT + " " + VALID_CHAT, "Extra data", id="two-objects"),
    pytest.param(
        json.dumps([{"messages": []}]), "JSON array; expected one JSON object per line (JSONL)", id="array"
    ),
    pytest.param('"hello"', "line is a JSON string; expected a JSON object", id="string"),
    pytest.param("42", "line is a JSON number; expected a JSON object", id="number"),
    pytest.param("null", "line is a JSON null", id="null"),
    pytest.param("{}", "empty object; expected 'messages'", id="empty-object"),
    pytest.param(
        json.dumps({"mesages": [USER, ASSISTANT]}),
        "unknown key 'mesages' (did you mean 'messages'?); expected 'messages' (chat) or 'prompt' and",
        id="typo-messages",
    ),
    pytest.param(
        '{"messages": "hi"}', "messages: expected a list of messages, got a JSON string", id="not-list"
    ),
    pytest.param('{"messages": {}}', "messages: expected a list of messages, got a JSON object", id="dict"),
    pytest.param('{"messages": []}', "messages: empty list", id="empty-messages"),
    pytest.param(
        chat_line("hi", ASSISTANT), "messages[0]: expected a message object, got a JSON string", id="msg-str"
    ),
    pytest.param(
        chat_line(USER, None), "messages[1]: expected a message object, got a JSON null", id="msg-null"
    ),
    pytest.param(
        chat_line(USER, ASSISTANT, {"role": "bot", "content": "hi"}),
        "messages[2].role: unknown role 'bot' (expected system, user or assistant)",
        id="unknown-role",
    ),
    pytest.param(
        chat_line(USER, {"role": "Assistant", "content": "4"}),
        "messages[1].role: unknown role 'Assistant' (did you mean 'assistant'?)",
        id="role-case",
    ),
    pytest.param(chat_line(USER, {"content": "4"}), "messages[1]: missing 'role'", id="missing-role"),
    pytest.param(
        chat_line({"role": 1, "content": "x"}, ASSISTANT),
        "messages[0].role: expected a string, got a JSON number",
        id="role-number",
    ),
    pytest.param(
        chat_line(USER, {"role": "assistant", "content": 4}),
        "messages[1].content: expected a string, got a JSON number",
        id="content-number",
    ),
    pytest.param(
        chat_line({"role": "user", "content": None}, ASSISTANT),
        "messages[0].content: expected a string, got a JSON null",
        id="content-null",
    ),
    pytest.param(
        chat_line(USER, {"role": "assistant", "content": [{"type": "text", "text": "4"}]}),
        "messages[1].content: expected a string, got a JSON array",
        id="content-parts",
    ),
    pytest.param(
        chat_line({"role": "user"}, ASSISTANT), "messages[0]: missing 'content'", id="missing-content"
    ),
    pytest.param(
        chat_line(USER, {"role": "assistant", "content": ""}),
        "messages[1].content: empty assistant message",
        id="empty-content",
    ),
    pytest.param(
        chat_line({"role": "user", "content": " \n\t"}, ASSISTANT),
        "messages[0].content: whitespace-only user message",
        id="blank-content",
    ),
    pytest.param(
        chat_line(USER, weighted(2)), "messages[1].weight: must be the integer 0 or 1, got 2", id="w-2"
    ),
    pytest.param(chat_line(USER, weighted(0.5)), "must be the integer 0 or 1, got 0.5", id="w-half"),
    pytest.param(chat_line(USER, weighted(1.0)), "must be the integer 0 or 1, got 1.0", id="w-float"),
    pytest.param(chat_line(USER, weighted(True)), "must be the integer 0 or 1, got true", id="w-true"),
    pytest.param(chat_line(USER, weighted(False)), "must be the integer 0 or 1, got false", id="w-false"),
    pytest.param(chat_line(USER, weighted("1")), 'must be the integer 0 or 1, got "1"', id="w-str"),
    pytest.param(chat_line(USER, weighted(None)), "must be the integer 0 or 1, got null", id="w-null"),
    pytest.param(
        chat_line({**USER, "weight": 1}, ASSISTANT),
        "messages[0].weight: only assistant messages may have a weight (this is 'user')",
        id="w-on-user",
    ),
    pytest.param(
        chat_line({**SYSTEM, "weight": 0}, USER, ASSISTANT),
        "messages[0].weight: only assistant messages may have a weight (this is 'system')",
        id="w-on-system",
    ),
    pytest.param(chat_line(USER), "messages: no assistant message", id="no-assistant"),
    pytest.param(chat_line(SYSTEM, USER), "messages: no assistant message", id="no-assistant-sys"),
    pytest.param(
        chat_line(USER, weighted(0), USER, weighted(0)),
        "messages: every assistant message has weight 0",
        id="all-weight-0",
    ),
    pytest.param(
        chat_line(USER, ASSISTANT, SYSTEM, USER, ASSISTANT),
        "messages[2].role: a system message is only allowed as the first message",
        id="system-late",
    ),
    pytest.param(
        chat_line(SYSTEM, SYSTEM, USER, ASSISTANT),
        "messages[1].role: a system message is only allowed as the first message",
        id="two-systems",
    ),
    pytest.param(
        chat_line(ASSISTANT, USER, ASSISTANT),
        "messages[0].role: the conversation must start with a user message, not 'assistant'",
        id="starts-assistant",
    ),
    pytest.param(
        chat_line(SYSTEM, ASSISTANT),
        "messages[1].role: the conversation must start with a user message, not 'assistant'",
        id="system-then-assistant",
    ),
    pytest.param(
        chat_line(USER, ASSISTANT, ASSISTANT),
        "messages[2].role: two 'assistant' messages in a row (messages[1] and messages[2])",
        id="two-assistants",
    ),
    pytest.param(
        chat_line(USER, USER, ASSISTANT),
        "messages[1].role: two 'user' messages in a row (messages[0] and messages[1])",
        id="two-users",
    ),
    pytest.param(
        chat_line(USER, ASSISTANT, completion="x"),
        "mixes chat ('messages') and prompt/completion ('completion') keys",
        id="mixed-keys",
    ),
    pytest.param(
        json.dumps({"messages": [USER, ASSISTANT], "prompt": "a", "completion": "b"}),
        "mixes chat ('messages') and prompt/completion ('prompt', 'completion') keys",
        id="mixed-keys-both",
    ),
    pytest.param(
        chat_line(USER, ASSISTANT, tools=[]),
        "unknown key 'tools' (a chat example has only 'messages')",
        id="extra-top-key",
    ),
    pytest.param(
        chat_line({**USER, "name": "bob"}, ASSISTANT),
        "messages[0]: unknown key 'name' (a message has role, content and optional weight)",
        id="extra-msg-key",
    ),
    pytest.param(
        chat_line(USER, {"role": "assistant", "contnet": "4"}),
        "messages[1]: unknown key 'contnet' (did you mean 'content'?)",
        id="typo-content",
    ),
]


@pytest.mark.parametrize(("bad", "reason"), CHAT_CASES)
def test_bad_chat_line_is_reported_with_line_number_and_reason(bad: str, reason: str) -> None:
    error = only_error(jsonl(VALID_CHAT, VALID_CHAT, bad, VALID_CHAT))
    assert error.line == 3
    assert reason in error.reason
    assert str(error) == f"line 3: {error.reason}"


PC_CASES = [
    pytest.param('{"prompt": "a"}', "missing 'completion'", id="missing-completion"),
    pytest.param('{"completion": "a"}', "missing 'prompt'", id="missing-prompt"),
    pytest.param(pc_line(prompt=3), "prompt: expected a string, got a JSON number", id="prompt-number"),
    pytest.param(
        pc_line(completion=4), "completion: expected a string, got a JSON number", id="completion-number"
    ),
    pytest.param(
        pc_line(completion=["a"]), "completion: expected a string, got a JSON array", id="completion-list"
    ),
    pytest.param(pc_line(prompt=None), "prompt: expected a string, got a JSON null", id="prompt-null"),
    pytest.param(pc_line(completion=""), "completion: empty or whitespace-only", id="empty-completion"),
    pytest.param(pc_line(completion="  \n"), "completion: empty or whitespace-only", id="blank-completion"),
    pytest.param(
        json.dumps({"prompt": "a", "completion": "b", "answer": "c"}),
        "unknown key 'answer' (a prompt/completion example has only 'prompt' and 'completion')",
        id="extra-key",
    ),
    pytest.param(
        json.dumps({"prompt": "a", "complete": "b"}),
        "unknown key 'complete' (did you mean 'completion'?)",
        id="typo-completion",
    ),
]


@pytest.mark.parametrize(("bad", "reason"), PC_CASES)
def test_bad_prompt_completion_line(bad: str, reason: str) -> None:
    error = only_error(jsonl(VALID_PC, VALID_PC, bad))
    assert (error.line, reason in error.reason) == (3, True), error


def test_all_chat_reasons_are_distinct() -> None:
    reasons = [str(p.values[1]) for p in CHAT_CASES + PC_CASES]
    # A few cases share a reason on purpose (same mistake, different spelling); the rest must differ.
    assert len(set(reasons)) >= len(reasons) - 5


def test_empty_prompt_is_allowed() -> None:
    report = validate(jsonl(pc_line(prompt="", completion="Once upon a time")))
    assert report.ok and report.format == PROMPT_COMPLETION


# --- byte-level problems ---------------------------------------------------------------------------------


def test_invalid_utf8_latin1_line() -> None:
    latin1 = json.dumps({"prompt": "Où est le café ?", "completion": "Ici."}, ensure_ascii=False)
    error = only_error(jsonl(VALID_PC) + latin1.encode("latin-1") + b"\n" + jsonl(VALID_PC))
    assert (error.line, error.reason) == (2, f"not valid UTF-8 (byte 0xf9 at column {latin1.index('ù') + 1})")


def test_invalid_utf8_column_counts_characters_not_bytes() -> None:
    line = b'{"prompt": "\xc3\xa9", "completion": "\xff"}'  # a valid é (2 bytes), then a bare 0xff
    error = only_error(jsonl(VALID_PC) + line + b"\n")
    assert (error.line, error.reason) == (2, "not valid UTF-8 (byte 0xff at column 32)")


def test_whole_latin1_file_reports_each_bad_line() -> None:
    text = "\n".join(pc_line(f"q{i}", f"r{i}") for i in range(5)).replace("r2", "ré").replace("r4", "rè")
    report = validate(text.encode("latin-1"))
    assert [(e.line, e.reason[:27]) for e in report.errors] == [
        (3, "not valid UTF-8 (byte 0xe9 "),
        (5, "not valid UTF-8 (byte 0xe8 "),
    ]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_file_is_one_whole_file_error(encoding: str) -> None:
    data = jsonl(*[VALID_CHAT] * 50).decode().encode(encoding)
    if encoding != "utf-16":  # the -le/-be codecs write no BOM; editors that save "Unicode" do
        data = "\ufeff".encode(encoding) + data
    report = validate(data)
    assert report.errors == [
        LineError(0, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    ]
    assert report.n_errors == 1
    assert str(report.errors[0]).startswith("file: the file is UTF-16")
    assert report.summary().startswith("training data is invalid:\nfile: ")


def test_utf8_bom_is_accepted_and_stripped() -> None:
    report = validate(b"\xef\xbb\xbf" + jsonl(VALID_CHAT, VALID_CHAT))
    assert report.ok and report.n_examples == 2 and report.n_lines == 2


def test_utf8_bom_in_the_middle_is_an_error() -> None:
    error = only_error(jsonl(VALID_CHAT) + b"\xef\xbb\xbf" + jsonl(VALID_CHAT))
    assert error.line == 2 and "starts with a UTF-8 byte-order mark" in error.reason


def test_gzip_file() -> None:
    report = validate(gzip.compress(jsonl(VALID_CHAT) * 100))
    assert report.errors == [LineError(0, "looks like a gzip file; upload uncompressed JSONL")]
    assert report.n_errors == 1


def test_zip_file() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train.jsonl", jsonl(VALID_CHAT))
    error = only_error(buffer.getvalue())
    assert (error.line, error.reason) == (0, "looks like a zip file; upload uncompressed JSONL")


def test_nul_bytes() -> None:
    error = only_error(jsonl(VALID_CHAT) + b'{"prompt": "a\x00b"}\n' + jsonl(VALID_CHAT))
    assert (error.line, "contains NUL bytes" in error.reason) == (2, True)


def test_json_array_file_on_one_line() -> None:
    error = only_error(json.dumps([json.loads(VALID_CHAT)] * 3).encode())
    assert error.line == 1
    assert "JSON array" in error.reason and "one JSON object per line (JSONL)" in error.reason


def test_pretty_printed_json_gets_a_hint() -> None:
    report = validate(json.dumps([json.loads(VALID_PC)], indent=2).encode())
    assert report.errors[0].line == 1
    assert "pretty-printed JSON" in report.errors[0].reason


def test_deeply_nested_line() -> None:
    deep = '{"prompt": "a", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = only_error(jsonl(VALID_PC, deep, VALID_PC))
    assert (error.line, error.reason) == (2, "JSON nested too deeply")


# --- line splitting, blank lines, CRLF, over-long lines ---------------------------------------------------


def test_blank_lines_are_skipped_but_counted() -> None:
    report = validate(b"\n" + jsonl(VALID_CHAT, "", "   \t", VALID_CHAT, "oops") + b"\n\n")
    assert (report.n_lines, report.n_examples) == (8, 2)
    assert [e.line for e in report.errors] == [6]


def test_last_line_without_newline_is_validated() -> None:
    report = validate(jsonl(VALID_PC) + b"oops")
    assert report.n_lines == 2 and [e.line for e in report.errors] == [2]
    report = validate(jsonl(VALID_PC) + VALID_PC.encode())
    assert report.ok and report.n_examples == 2


def test_crlf_line_endings() -> None:
    data = (VALID_CHAT + "\r\n" + VALID_CHAT + "\r\n\r\n" + '{"messages": [}' + "\r\n" + VALID_CHAT).encode()
    report = validate(data)
    assert report.n_examples == 3 and report.n_lines == 5
    assert report.errors == [LineError(4, "not valid JSON: Expecting value (column 15)")]


def test_empty_file() -> None:
    assert only_error(b"") == LineError(0, "the file is empty")
    assert only_error(b"\xef\xbb\xbf") == LineError(0, "the file is empty")


def test_whitespace_only_file() -> None:
    error = only_error(b"\n  \r\n\t\n")
    assert error.line == 0 and "no examples" in error.reason


def test_over_long_line_and_lines_after_it() -> None:
    long_line = pc_line("x" * 5000, "y")
    data = jsonl(VALID_PC, long_line, VALID_PC, "oops", VALID_PC)
    report = validate(data, max_line_bytes=1000)
    assert report.errors[0] == LineError(
        2, f"line is too long ({len(long_line):,} bytes; the limit is 1,000)"
    )
    assert [e.line for e in report.errors] == [2, 4]
    assert report.n_examples == 3 and report.n_lines == 5
    # The same, streamed in small chunks: the long line is discarded as it arrives.
    assert validate_in_chunks(data, 64, max_line_bytes=1000) == report


def test_line_length_limit_is_exact_and_ignores_the_line_ending() -> None:
    line = pc_line("x" * 100, "y")
    limit = len(line)
    assert validate(jsonl(line), max_line_bytes=limit).ok
    assert validate((line + "\r\n").encode(), max_line_bytes=limit).ok
    assert validate(line.encode(), max_line_bytes=limit).ok
    error = only_error(jsonl(line), max_line_bytes=limit - 1)
    assert error.line == 1 and "line is too long" in error.reason
    for size in (1, 7, 1000):
        assert validate_in_chunks((line + "\r\n").encode(), size, max_line_bytes=limit).ok


def test_over_long_line_is_not_buffered() -> None:
    validator = StreamingValidator(max_line_bytes=1000)
    validator.feed(jsonl(VALID_PC))
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        for _ in range(160):  # a 10 MiB line
            validator.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    validator.feed(b"\n" + jsonl(VALID_PC))
    report = validator.finish()
    assert report.errors == [LineError(2, "line is too long (10,485,760 bytes; the limit is 1,000)")]
    assert report.n_examples == 2


def test_default_line_limit() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 4 * 1024 * 1024
    assert validate(jsonl(pc_line("x" * 1_000_000, "y"))).ok


# --- many errors at once ----------------------------------------------------------------------------------


def test_several_bad_lines_reported_at_once_in_line_order() -> None:
    lines = [VALID_CHAT] * 10
    lines[1] = "not json"
    lines[4] = chat_line(USER, {"role": "bot", "content": "x"})
    lines[5] = VALID_PC
    lines[8] = chat_line(USER, weighted(2))
    report = validate(jsonl(*lines))
    assert [e.line for e in report.errors] == [2, 5, 6, 9]
    assert report.n_errors == 4 and report.n_examples == 6 and report.format == CHAT
    summary = report.summary()
    assert summary.splitlines()[0] == "4 bad lines in training data:"
    assert summary.splitlines()[1].startswith("line 2: not valid JSON")
    assert "line 5: messages[1].role: unknown role 'bot'" in summary
    assert "line 6: prompt/completion example in a chat file (line 1 set the format)" in summary
    assert "... and" not in summary


def test_error_cap() -> None:
    report = validate(jsonl(*["bad"] * 250), max_errors=100)
    assert report.n_errors == 250
    assert [e.line for e in report.errors] == list(range(1, 101))
    summary = report.summary()
    assert summary.splitlines()[0] == "250 bad lines in training data:"
    assert len(summary.splitlines()) == 22 and summary.endswith("\n... and 230 more")
    assert report.summary(limit=3).endswith("line 3: " + report.errors[2].reason + "\n... and 247 more")
    assert report.format is None and report.n_examples == 0


def test_one_bad_line_in_ten_thousand(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [
        chat_line(SYSTEM, USER, {"role": "assistant", "content": f"answer {i} " + "z" * 480})
        for i in range(10_000)
    ]
    lines[9998] = chat_line(USER, {"role": "assistant", "content": 7})
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 5_000_000
    start = time.perf_counter()
    report = validate_file(path)
    elapsed = time.perf_counter() - start
    assert report.errors == [LineError(9999, "messages[1].content: expected a string, got a JSON number")]
    assert (report.n_errors, report.n_examples, report.n_lines) == (1, 9999, 10_000)
    assert elapsed < 3.0  # well under a second in practice; generous for slow CI machines


def test_mixed_formats() -> None:
    report = validate(jsonl(VALID_CHAT, VALID_CHAT, VALID_PC, VALID_CHAT))
    assert report.errors == [LineError(3, "prompt/completion example in a chat file (line 1 set the format)")]
    # The format is set by the first *valid* line, not the first line.
    report = validate(jsonl(chat_line(USER), VALID_PC, VALID_PC, VALID_CHAT))
    assert report.format == PROMPT_COMPLETION
    assert [e.line for e in report.errors] == [1, 4]
    assert report.errors[1].reason == "chat example in a prompt/completion file (line 2 set the format)"


# --- streaming --------------------------------------------------------------------------------------------


def validate_in_chunks(data: bytes, size: int, **kwargs: Any) -> ValidationReport:
    validator = StreamingValidator(**kwargs)
    for start in range(0, len(data), size):
        validator.feed(data[start : start + size])
    return validator.finish()


STREAM_CORPUS = [
    b"\xef\xbb\xbf" + jsonl(VALID_CHAT, "", "oops", VALID_PC) + pc_line("x" * 300, "y").encode() + b"\r\n",
    (VALID_CHAT + "\r\n\r\n" + chat_line(SYSTEM, USER, weighted(0), USER, ASSISTANT) + "\r\n").encode()
    + "é".encode("latin-1")
    + b"\n{\x00}\n"
    + '{"prompt": "caf\u00e9", "completion": "\u6f22\u5b57"}'.encode()
    + b"\n"
    + b"[" * 5000,
    "\n".join(pc_line("é" * 150, "ü" * i) for i in range(20)).encode(),  # multi-byte chars split by chunks
    jsonl(*["x" * 250] * 5, VALID_PC),
    b"\xff\xfe" + jsonl(VALID_CHAT).decode().encode("utf-16-le"),
    gzip.compress(jsonl(VALID_CHAT)),
    b"",
    b"\n",
    b"\xef\xbb",
]


@pytest.mark.parametrize("data", STREAM_CORPUS)
def test_streaming_in_chunks_matches_one_chunk(data: bytes) -> None:
    kwargs: dict[str, Any] = {"max_line_bytes": 200, "keep_examples": True}
    whole = StreamingValidator(**kwargs)
    whole.feed(data)
    expected = whole.finish()
    for size in (1, 2, 3, 7, 64, 199, 200, 201, 65536):
        assert validate_in_chunks(data, size, **kwargs) == expected, size
    rng = random.Random(len(data))
    for _ in range(20):  # random split points, including empty chunks
        validator = StreamingValidator(**kwargs)
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 30)))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            validator.feed(data[start:end])
        assert validator.finish() == expected
        assert validator.examples == whole.examples


def test_feed_after_finish_is_an_error_and_finish_is_idempotent() -> None:
    validator = StreamingValidator()
    validator.feed(jsonl(VALID_CHAT))
    report = validator.finish()
    assert validator.finish() is report
    with pytest.raises(RuntimeError):
        validator.feed(b"more")


def test_examples_are_kept_only_when_asked() -> None:
    validator = StreamingValidator()
    validator.feed(jsonl(VALID_CHAT))
    validator.finish()
    assert validator.examples == []


# --- parsing valid files ----------------------------------------------------------------------------------


def test_valid_chat_file_parses_into_dataclasses(tmp_path: Path) -> None:
    multi_turn = chat_line(SYSTEM, USER, weighted(0), {"role": "user", "content": "And 3+3?"}, weighted(1))
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl(VALID_CHAT, "", multi_turn) + chat_line(USER, weighted(1)).encode())
    fmt, examples = read_examples(path)
    assert fmt == CHAT
    assert examples == [
        ChatExample((Message("user", "What is 2+2?", 0), Message("assistant", "4", 1)), line=1),
        ChatExample(
            (
                Message("system", "You are terse.", 0),
                Message("user", "What is 2+2?", 0),
                Message("assistant", "4", 0),
                Message("user", "And 3+3?", 0),
                Message("assistant", "4", 1),
            ),
            line=3,
        ),
        ChatExample((Message("user", "What is 2+2?", 0), Message("assistant", "4", 1)), line=4),
    ]
    assert validate_file(path).ok


def test_valid_prompt_completion_file(tmp_path: Path) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_bytes(b"\r\n" + (pc_line("Q: hi\nA:", " hello") + "\r\n" + pc_line("", "story")).encode())
    assert read_examples(str(path)) == (
        PROMPT_COMPLETION,
        [
            PromptCompletionExample("Q: hi\nA:", " hello", line=2),
            PromptCompletionExample("", "story", line=3),
        ],
    )
    report = validate_file(path)
    assert report == ValidationReport(
        format=PROMPT_COMPLETION, n_examples=2, n_lines=3, errors=[], n_errors=0
    )
    assert report.summary() == "2 valid prompt/completion examples"


def test_parse_example_directly() -> None:
    assert parse_example(json.loads(VALID_PC), 5) == PromptCompletionExample("2+2=", "4", 5)
    with pytest.raises(ValueError, match=r"^messages\[1\]\.role: unknown role 'bot'"):
        parse_example({"messages": [USER, {"role": "bot", "content": "x"}]}, 1)


def test_read_examples_raises_with_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(VALID_CHAT, "{", VALID_CHAT, chat_line(USER)))
    with pytest.raises(DataFormatError) as caught:
        read_examples(path)
    assert isinstance(caught.value, ValueError)
    text = str(caught.value)
    assert text == caught.value.report.summary()
    assert text.splitlines()[0] == "2 bad lines in training data:"
    assert "\nline 2: not valid JSON" in text and "\nline 4: messages: no assistant message" in text


def test_read_examples_keeps_up_to_1000_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(*["bad"] * 1500))
    with pytest.raises(DataFormatError) as caught:
        read_examples(path)
    assert (len(caught.value.report.errors), caught.value.report.n_errors) == (1000, 1500)


def test_read_examples_rejects_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(DataFormatError, match="file: no examples"):
        read_examples(path)


def test_report_strings() -> None:
    assert str(LineError(7, "boom")) == "line 7: boom"
    assert str(LineError(0, "boom")) == "file: boom"
    one = ValidationReport(format=CHAT, n_examples=3, n_lines=4, errors=[LineError(2, "x")], n_errors=1)
    assert one.summary() == "1 bad line in training data:\nline 2: x"
    assert not one.ok
    assert ValidationReport(format=CHAT, n_examples=1, n_lines=1).summary() == "1 valid chat example"


def test_module_does_not_import_torch() -> None:
    code = "import worker.training.formats, sys; assert not {'torch', 'pydantic'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
