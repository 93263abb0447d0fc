"""lmservice/batch/files.py: envelopes checked line by line, duplicate custom_ids, what an output file already
answers (a torn last line trimmed, a foreign file refused), and records written whole. No model."""

from __future__ import annotations

import errno
import json
import os

import pytest

from lmservice.batch.files import (
    BatchRequest,
    Finished,
    LineError,
    OutputFile,
    OutputFileError,
    error_record,
    parse_line,
    planned,
    read_finished,
    response_record,
)


def _line(**fields) -> bytes:
    entry = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}
    entry.update(fields)
    return json.dumps({k: v for k, v in entry.items() if v is not ...}).encode()


def test_a_sound_envelope_is_a_request_whatever_its_body():
    item = parse_line(3, _line(body={"prompt": "hi", "max_tokens": -1}))  # the body is the server's to judge
    assert item == BatchRequest(3, "a", "/v1/completions", {"prompt": "hi", "max_tokens": -1})
    for url in ("/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/translate"):
        assert isinstance(parse_line(1, _line(url=url)), BatchRequest)
    assert isinstance(parse_line(1, _line(body={"prompt": "hi", "stream": False})), BatchRequest)


@pytest.mark.parametrize("raw, code, custom_id", [
    (b"not json", "invalid_json_line", None),
    (b'{"custom_id": "a", ', "invalid_json_line", None),
    (b"\xff\xfe{}", "invalid_json_line", None),
    (b"[1, 2]", "invalid_json_line", None),
    (b"[" * 100_000, "invalid_json_line", None),
    (_line(custom_id=...), "missing_required_parameter", None),
    (_line(custom_id=7), "invalid_parameter", None),
    (_line(custom_id=""), "invalid_parameter", None),
    (_line(method=...), "missing_required_parameter", "a"),
    (_line(url=...), "missing_required_parameter", "a"),
    (_line(body=...), "missing_required_parameter", "a"),
    (_line(method="GET"), "unsupported_method", "a"),
    (_line(url="/v1/models"), "unsupported_url", "a"),
    (_line(url="/v1/generate"), "unsupported_url", "a"),
    (_line(body="prompt=hi"), "invalid_parameter", "a"),
    (_line(body={"prompt": "hi", "stream": True}), "streaming_unsupported", "a"),
])
def test_a_bad_envelope_is_one_error_naming_its_line(raw, code, custom_id):
    item = parse_line(5, raw)
    assert isinstance(item, LineError)
    assert (item.code, item.custom_id, item.line_number) == (code, custom_id, 5)
    assert item.message.startswith("line 5: ")
    record = error_record(item)
    assert record["response"] is None and record["error"] == {"code": code, "message": item.message, "line": 5}
    assert record["id"].startswith("batch_req_")


def _write(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_planned_skips_blank_lines_and_refuses_a_duplicate_id(tmp_path):
    path = tmp_path / "in.jsonl"
    _write(path, _line(custom_id="a"), b"", b"   ", _line(custom_id="b", url="/nope"), _line(custom_id="a"),
           _line(custom_id="b"), _line(custom_id="c"))
    items = list(planned(path, Finished()))
    assert [(i.line_number, i.custom_id, getattr(i, "code", None)) for i in items] == [
        (1, "a", None), (4, "b", "unsupported_url"),  # the first line with an id claims it, sound or not
        (5, "a", "duplicate_custom_id"), (6, "b", "duplicate_custom_id"), (7, "c", None)]


def test_planned_skips_what_the_output_answers(tmp_path):
    path = tmp_path / "in.jsonl"
    _write(path, _line(custom_id="a"), b"oops", _line(custom_id="a"), _line(custom_id="b"), _line(custom_id="c"))
    out = tmp_path / "out.jsonl"
    f = OutputFile(out)
    everything = list(planned(path, Finished()))
    assert len(everything) == 5
    # answered: the line that claimed "a", the duplicate of it, and the unparseable line
    f.append(response_record("a", 200, "r1", {"x": 1}))
    for item in everything:
        if isinstance(item, LineError):
            f.append(error_record(item))
    f.close()
    finished = read_finished(out)
    assert finished.num_records == 3
    assert [(i.line_number, i.custom_id) for i in planned(path, finished)] == [(4, "b"), (5, "c")]
    # negative control: a duplicate's error answers its line only, never the id it repeats
    f = OutputFile(out)
    f.append(error_record(LineError(9, "b", "duplicate_custom_id", "line 9: ...")))
    f.close()
    assert [i.custom_id for i in planned(path, read_finished(out))] == ["b", "c"]


def test_read_finished_trims_a_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = json.dumps(response_record("a", 200, "r", {"text": "ok"})).encode() + b"\n"
    out.write_bytes(whole + b'{"id": "batch_req_1", "custom_id": "b", "resp')
    finished = read_finished(out)
    assert finished.custom_ids == {"a"} and out.read_bytes() == whole
    # a complete-looking record without its newline is torn too: it is answered again
    out.write_bytes(whole + whole.rstrip(b"\n").replace(b'"a"', b'"b"'))
    assert read_finished(out).custom_ids == {"a"} and out.read_bytes() == whole
    assert read_finished(tmp_path / "absent.jsonl").num_records == 0


def test_read_finished_refuses_a_file_that_is_not_all_records(tmp_path):
    out = tmp_path / "out.jsonl"
    record = json.dumps(response_record("a", 200, "r", {})).encode()
    out.write_bytes(b"some notes\n" + record + b"\n")
    with pytest.raises(OutputFileError, match="not a batch output record"):
        read_finished(out)
    assert out.read_bytes() == b"some notes\n" + record + b"\n"  # untouched


def test_output_file_appends_whole_lines_even_for_lone_surrogates(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(json.dumps(response_record("old", 200, None, {})).encode() + b"\n")
    f = OutputFile(out)
    f.append(response_record("snow \u2603 \ud800", 200, "r", {"text": "Ein Mann f\u00e4hrt."}))
    f.close()
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert "fährt".encode() in lines[1]  # readable text, not \\u escapes
    record = json.loads(lines[1])
    assert record["custom_id"] == "snow \u2603 \ud800" and record["response"]["body"]["text"] == "Ein Mann fährt."
    assert read_finished(out).custom_ids == {"old", "snow \u2603 \ud800"}


def test_a_failed_write_cuts_the_file_back_and_refuses_later_appends(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    f = OutputFile(out)
    f.append(response_record("a", 200, "r", {}))
    whole = out.read_bytes()
    real_write = os.write

    def partial_then_full_disk(fd, data):
        if len(data) > 20:
            return real_write(fd, bytes(data[:20]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", partial_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        f.append(response_record("b", 200, "r", {"text": "a longer answer"}))
    monkeypatch.undo()
    assert out.read_bytes() == whole  # the 20 bytes that landed are gone
    with pytest.raises(OSError, match="an earlier write"):  # nothing may follow a possibly torn line
        f.append(response_record("c", 200, "r", {}))
    f.close()
    assert read_finished(out).custom_ids == {"a"}
