"""HTTP Range on a checkpoint's tar: `Range: bytes=N-` resumes an interrupted download."""

from __future__ import annotations

from tests.service.conftest import Stack
from tests.service.helpers import add_checkpoint, new_job


def test_checkpoint_content_serves_byte_ranges(stack: Stack) -> None:
    client = stack.team()
    job = new_job(stack, client)
    files = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 9000}
    checkpoint = add_checkpoint(stack, job["id"], 5, files)
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{checkpoint}/content"

    whole = client.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    body = whole.content
    length = len(body)
    assert int(whole.headers["content-length"]) == length and "content-range" not in whole.headers

    # Every offset class: 0, inside a header, inside a file, inside padding/trailer, the last byte.
    for start in (0, 100, 513, 700_000, length - 3000, length - 1):
        part = client.get(url, headers={"Range": f"bytes={start}-"})
        assert part.status_code == 206, (start, part.text)
        assert part.headers["content-range"] == f"bytes {start}-{length - 1}/{length}"
        assert int(part.headers["content-length"]) == length - start
        assert part.content == body[start:], start

    # A closed range and a suffix range.
    closed = client.get(url, headers={"Range": "bytes=10-1033"})
    assert closed.status_code == 206 and closed.content == body[10:1034]
    assert closed.headers["content-range"] == f"bytes 10-1033/{length}"
    suffix = client.get(url, headers={"Range": "bytes=-100"})
    assert suffix.status_code == 206 and suffix.content == body[-100:]

    # Past the end: 416 with the OpenAI error body and the length.
    for bad in (f"bytes={length}-", f"bytes={length + 10}-"):
        refused = client.get(url, headers={"Range": bad})
        assert refused.status_code == 416
        assert refused.headers["content-range"] == f"bytes */{length}"
        error = refused.json()["error"]
        assert error["code"] == "range_not_satisfiable" and error["type"] == "invalid_request_error"

    # A header this does not understand is ignored: the whole archive.
    ignored = client.get(url, headers={"Range": "items=0-4"})
    assert ignored.status_code == 200 and ignored.content == body
