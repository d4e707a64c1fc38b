"""Bad training data, through the real API on SQLite and PostgreSQL: each upload is a 400 with
param "file" whose message names the line (or "file:" for the whole file) and the reason, and
nothing of it is stored: no File row, no bytes in storage.

The validator itself (worker/training/formats.py) is unit-tested in
tests/worker/training/test_formats.py; this catalogue proves the answers a user gets. Elsewhere:
tests/service/test_files.py (several bad lines in one answer, the cap on listed lines, an over-long
line while streaming into a small-limit API, malformed multipart bodies) and, at job time,
tests/e2e/test_failures.py (every example longer than max_seq_length, with overlength=drop and
with the default, truncate).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from service.models import File
from tests.service.conftest import Stack, TeamClient, upload

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
SYSTEM = {"role": "system", "content": "Be brief."}


def chat(*messages: dict[str, Any]) -> str:
    return json.dumps({"messages": list(messages)}, ensure_ascii=False)


def pc(prompt: Any = "2 + 2 =", completion: Any = " 4") -> str:
    return json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False)


def jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


VALID = chat(USER, ASSISTANT)
ROWS = [json.loads(VALID)] * 3


def one_bad_line_in_10_000(_max_line_bytes: int) -> bytes:
    """10,000 lines (~1 MB, built in memory) whose line 9,999 has a number as its answer."""
    lines = [chat(USER, {"role": "assistant", "content": f"answer {i}"}) for i in range(10_000)]
    lines[9998] = chat(USER, {"role": "assistant", "content": 7})
    return jsonl(*lines)


def a_line_over_the_limit(max_line_bytes: int) -> bytes:
    """Line 2 one byte over TUNEPOOL_MAX_LINE_BYTES (the stack runs the default, 4 MiB)."""
    long_line = pc("x" * max_line_bytes, "y")[: max_line_bytes + 1]  # its length, not its JSON, matters
    return jsonl(VALID, long_line, VALID)


def nested(opening: str, closing: str, inner: str = "", depth: int = 100_000) -> str:
    return opening * depth + inner + closing * depth


Content = bytes | Callable[[int], bytes]
# id: (file content, or a function of TUNEPOOL_MAX_LINE_BYTES giving it; fragments the message must hold)
CATALOGUE: dict[str, tuple[Content, list[str]]] = {
    "empty": (b"", ["file: the file is empty"]),
    "whitespace-only": (b"  \n\t\r\n\n   ", ["file: no examples: the file has only blank lines"]),
    "utf-16-with-bom": (
        jsonl(VALID, VALID).decode().encode("utf-16"),
        ["file: the file is UTF-16", "save it as UTF-8"],
    ),
    "utf-16-le-without-bom": (
        jsonl(VALID, VALID).decode().encode("utf-16-le"),
        ["file: the file looks like UTF-16", "save it as UTF-8"],
    ),
    "utf-16-be-without-bom": (
        jsonl(VALID, VALID).decode().encode("utf-16-be"),
        ["file: the file looks like UTF-16", "save it as UTF-8"],
    ),
    "latin-1": (  # "é" is the single byte 0xe9 in Latin-1: column 19 of line 2
        jsonl(VALID, pc("un café"), VALID).decode().encode("latin-1"),
        ["line 2: not valid UTF-8 (byte 0xe9 at column 19)"],
    ),
    "gzip": (gzip.compress(jsonl(VALID) * 50), ["file: looks like a gzip file; upload uncompressed JSONL"]),
    "zstd": (b"\x28\xb5\x2f\xfd" + bytes(range(1, 200)), ["file: looks like a zstd file"]),
    "xz": (b"\xfd7zXZ\x00" + bytes(range(1, 200)), ["file: looks like an xz file"]),
    "parquet": (b"PAR1" + bytes(200) + b"PAR1", ["file: looks like a Parquet file; convert it to JSONL"]),
    "binary": (bytes(range(256)) * 16, ["file: looks like a binary file", "not JSONL text"]),
    "binary-without-a-leading-nul": (  # a PNG: caught line by line, its NUL bytes named as binary
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",
        [
            "line 1: not valid UTF-8 (byte 0x89 at column 1)",
            "line 3: contains NUL bytes; is this a binary file?",
        ],
    ),
    "json-array-on-one-line": (
        json.dumps(ROWS).encode(),
        ["line 1: line is a JSON array; expected one JSON object per line (JSONL)"],
    ),
    "json-array-pretty-printed": (
        json.dumps(ROWS, indent=2).encode(),
        ["line 1: not valid JSON", "pretty-printed JSON, expected one JSON object per line (JSONL)"],
    ),
    "one-bad-line-at-9999-of-10000": (
        one_bad_line_in_10_000,
        ["1 bad line in training data:\nline 9999: messages[1].content: expected a string, got a JSON num"],
    ),
    "line-over-the-limit": (
        a_line_over_the_limit,
        ["line 2: line is too long (4,194,305 bytes; the limit is 4,194,304)"],
    ),
    "nul-bytes": (jsonl(VALID, '{"prompt": "a\x00b", "completion": "c"}'), ["line 2: contains NUL bytes"]),
    "nested-100000-lists": (
        jsonl(VALID, '{"messages": ' + nested("[", "]") + "}"),
        ["line 2: JSON nested too deeply"],
    ),
    "nested-100000-objects": (jsonl(nested('{"a": ', "}", inner="1")), ["line 1: JSON nested too deeply"]),
    "messages-a-string": (
        jsonl('{"messages": "hello"}'),
        ["line 1: messages: expected a list of messages, got a JSON string"],
    ),
    "messages-an-object": (
        jsonl(VALID, json.dumps({"messages": USER})),
        ["line 2: messages: expected a list of messages, got a JSON object"],
    ),
    "assistant-first": (
        jsonl(chat(ASSISTANT, USER, ASSISTANT)),
        ["line 1: messages[0].role: the conversation must start with a user message, not 'assistant'"],
    ),
    "two-users-in-a-row": (
        jsonl(VALID, chat(USER, USER, ASSISTANT)),
        ["line 2: messages[1].role: two 'user' messages in a row"],
    ),
    "system-not-first": (
        jsonl(chat(USER, SYSTEM, ASSISTANT)),
        ["line 1: messages[1].role: a system message is only allowed as the first message"],
    ),
    "unknown-role": (
        jsonl(chat(USER, {"role": "bot", "content": "4"})),
        ["line 1: messages[1].role: unknown role 'bot' (expected system, user or assistant)"],
    ),
    "role-in-capitals": (
        jsonl(chat({"role": "User", "content": "hi"}, ASSISTANT)),
        ["line 1: messages[0].role: unknown role 'User' (did you mean 'user'?)"],
    ),
    "no-assistant": (
        jsonl(VALID, chat(SYSTEM, USER)),
        ["line 2: messages: no assistant message; there is nothing to train on"],
    ),
    "every-assistant-weight-0": (
        jsonl(chat(USER, {**ASSISTANT, "weight": 0})),
        ["line 1: messages: every assistant message has weight 0; there is nothing to train on"],
    ),
    "weight-2": (
        jsonl(chat(USER, {**ASSISTANT, "weight": 2})),
        ["line 1: messages[1].weight: must be the integer 0 or 1, got 2"],
    ),
    "weight-true": (
        jsonl(chat(USER, {**ASSISTANT, "weight": True})),
        ["line 1: messages[1].weight: must be the integer 0 or 1, got true"],
    ),
    "weight-on-a-user-message": (
        jsonl(chat({**USER, "weight": 1}, ASSISTANT)),
        ["line 1: messages[0].weight: only assistant messages may have a weight"],
    ),
    "number-as-content": (
        jsonl(chat(USER, {"role": "assistant", "content": 4})),
        ["line 1: messages[1].content: expected a string, got a JSON number"],
    ),
    "number-as-prompt": (jsonl(pc(), pc(prompt=2)), ["line 2: prompt: expected a string, got a JSON number"]),
    "number-as-completion": (
        jsonl(pc(completion=4.0)),
        ["line 1: completion: expected a string, got a JSON number"],
    ),
    "chat-then-prompt-completion": (
        jsonl(VALID, VALID, pc()),
        ["line 3: prompt/completion example in a chat file (line 1 set the format)"],
    ),
    "prompt-completion-then-chat": (
        jsonl(pc(), VALID),
        ["line 2: chat example in a prompt/completion file (line 1 set the format)"],
    ),
    "both-formats-on-one-line": (
        jsonl(json.dumps({"messages": [USER, ASSISTANT], "prompt": "a", "completion": "b"})),
        ["line 1: mixes chat ('messages') and prompt/completion ('prompt', 'completion') keys"],
    ),
}


def stored_rows(stack: Stack, client: TeamClient) -> int:
    with stack.db.session() as session:
        return int(
            session.scalar(select(func.count()).select_from(File).where(File.team_id == client.team_id)) or 0
        )


@pytest.mark.parametrize(("content", "fragments"), CATALOGUE.values(), ids=CATALOGUE.keys())
def test_bad_training_data_is_refused_with_line_and_reason(
    stack: Stack, content: Content, fragments: list[str]
) -> None:
    client = stack.team()
    data = content(stack.settings.max_line_bytes) if callable(content) else content
    before = stack.storage_files()
    response = upload(client, data)
    assert response.status_code == 400, response.text[:2000]
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("file", "invalid_file", "invalid_request_error")
    for fragment in fragments:
        assert fragment in error["message"], error["message"][:2000]
    assert stack.storage_files() == before  # neither the file nor its temporary copy is kept
    assert client.get("/v1/files").json()["data"] == [] and stored_rows(stack, client) == 0


def test_the_catalogue_leaves_the_api_serving(stack: Stack) -> None:
    """After every bad file above (and 100,000-deep nesting), the same API still takes a good one."""
    client = stack.team()
    response = upload(client, jsonl(VALID, VALID))
    assert response.status_code == 200, response.text
    assert (response.json()["n_examples"], response.json()["format"]) == (2, "chat")
