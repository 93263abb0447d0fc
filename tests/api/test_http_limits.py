"""Header bombs and slow bodies against a real server, on raw sockets: each is refused (414/431/408, or the
connection closed) within the limits of lmservice/api/protocol.py, while an innocent stream beside it is
unchanged and /health keeps answering. Also the head scanner alone, on heads that must pass."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lmservice.api.protocol import HttpLimits, _HeadScan
from tests.api.bystander import Bystander, innocent_text
from tests.servers import API_KEY, start_server

LIMITS = HttpLimits(max_header_line_bytes=8192, max_header_bytes=65536, max_headers=100, header_read_timeout_s=10,
                    body_read_timeout_s=1.0)


@pytest.fixture(scope="module")
def limited(model_dirs, tmp_path_factory):
    srv = start_server(model_dirs, tmp_path_factory, "limits", "--api-key", API_KEY, "--body-read-timeout-s", "1",
                       "--header-read-timeout-s", "5")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alone(limited) -> str:
    return innocent_text(limited.url)


def _attack(port: int, pieces, pause_s: float = 0.0, read_timeout_s: float = 10.0) -> tuple[bytes, float, bool]:
    """Send `pieces` (pausing between them) while reading; (what came back, seconds to the server's close,
    whether every piece went out). A reset while sending counts as the server's refusal."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    received = bytearray()
    closed = threading.Event()
    start = time.monotonic()

    def read() -> None:
        sock.settimeout(read_timeout_s)
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
        except OSError:
            pass
        closed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent_all = True
    try:
        for piece in pieces:
            if closed.is_set():
                sent_all = False
                break
            sock.sendall(piece)
            if pause_s:
                time.sleep(pause_s)
    except OSError:
        sent_all = False
    closed.wait(read_timeout_s)
    elapsed = time.monotonic() - start
    sock.close()
    return bytes(received), elapsed, sent_all


def _status(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


def test_an_8_mb_header_value_is_refused(limited, alone):
    with Bystander(limited.url, alone):
        value = b"a" * (8 << 20)
        response, _, sent_all = _attack(limited.port, [HEAD, b"X-Big: ", *[value[i:i + 65536] for i in
                                                                        range(0, len(value), 65536)], b"\r\n\r\n"])
    assert _status(response) == 431 or (not sent_all and not response), response[:200]
    assert not sent_all  # closed long before the 8 MB were read


def test_20000_headers_of_1_kb_are_refused(limited, alone):
    with Bystander(limited.url, alone):
        headers = [b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(20000)]
        response, _, sent_all = _attack(limited.port, [HEAD, *headers, b"\r\n"])
    assert _status(response) == 431 or (not sent_all and not response), response[:200]
    assert not sent_all


def test_too_many_small_headers_and_a_long_request_line(limited):
    response, _, _ = _attack(limited.port, [HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"])
    assert _status(response) == 431 and b"more than 100 header fields" in response
    response, _, _ = _attack(limited.port, [b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert _status(response) == 414


def test_a_slowly_streamed_huge_header_line_is_cut_at_the_limit(limited, alone):
    with Bystander(limited.url, alone):
        chunks = [HEAD, b"X-Slow: "] + [b"c" * 1024] * 64  # 64 KiB, 1 KiB every 20 ms
        response, elapsed, sent_all = _attack(limited.port, chunks, pause_s=0.02)
    assert _status(response) == 431 and not sent_all
    assert elapsed < 1.0  # refused once the line passed 8 KiB (~0.16 s), not after the whole line


def test_a_slow_body_gets_408_after_the_body_read_timeout(limited, alone):
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
            b"\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n")
    with Bystander(limited.url, alone):
        response, elapsed, sent_all = _attack(limited.port, [head] + [b" "] * 40, pause_s=0.1)
    assert _status(response) == 408 and not sent_all
    assert 0.9 < elapsed < 3.0


def test_ordinary_requests_pass_on_a_kept_alive_connection(limited):
    body = b'{"prompt": "hi",\n\n\n "max_tokens": 2}'  # blank lines in the body are not the head's
    request = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
               b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    last = HEAD + b"X-Fine: " + b"d" * 8000 + b"\r\nConnection: close\r\n\r\n"
    response, _, sent_all = _attack(limited.port, [request, request, last], pause_s=0.3)
    assert sent_all and response.count(b"HTTP/1.1 200 OK") == 3, response[:500]


def test_a_pipelined_body_is_not_taken_for_a_head(limited):
    body = b'{"prompt": "' + b"z" * 9000 + b'"}'  # one line longer than a header line may be
    post = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
            b"\r\ncontent-type: application/json\r\nConnection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
    response, _, sent_all = _attack(limited.port, [HEAD + b"\r\n" + post + body[:100], body[100:]], pause_s=0.3)
    assert sent_all and response.count(b"HTTP/1.1 200 OK") == 2, response[-600:]


@pytest.mark.parametrize("chunks", [
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n{\n\n\n\n}"],  # the body's newlines are not counted
    [b"GET / HTTP/1.1\r", b"\nHost: x\r\n", b"\r", b"\n" + b"\n" * 500],  # split anywhere
    [b"GET / HTTP/1.1\nHost: x\n\n"],  # bare LF
])
def test_the_head_scan_stops_at_the_empty_line(chunks):
    scan = _HeadScan()
    assert all(scan.feed(c, LIMITS) is None for c in chunks)
    assert not scan.is_open and scan.num_lines == 2


def test_the_head_scan_counts_across_chunks():
    scan = _HeadScan()
    assert scan.feed(b"GET / HTTP/1.1\r\nX: " + b"e" * 8000, LIMITS) is None
    assert scan.feed(b"e" * 200, LIMITS) == (431, "a header line is longer than 8192 bytes")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_eight_sockets_streaming_huge_header_lines_cost_no_memory(limited, alone):
    before = _rss_mib(limited.proc.pid)
    line = [b"f" * 65536] * 512  # 32 MiB each, if the server read it all
    results = []
    with Bystander(limited.url, alone):
        threads = [threading.Thread(target=lambda: results.append(_attack(limited.port, [HEAD, b"X-Huge: ", *line])))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    growth = _rss_mib(limited.proc.pid) - before
    print(f"RSS growth with 8 header bombs: {growth:.1f} MiB")
    assert len(results) == 8 and not any(sent_all for _, _, sent_all in results)
    assert growth < 50
