"""Every example in docs/api.md and README.md, run against `lmservice serve` on the shipped models/.

What counts as an example (the convention docs/api.md states):
- in a ```bash block that contains `curl`, every line that starts with `curl` begins a command, and the
  lines after it that are neither blank nor `#` comments continue it; `#` lines show sample output. A
  `# expect: <status>` line names the status of the command right after it; without one, the command must
  answer 2xx with JSON, or with server-sent events when its body asks for `"stream": true`;
- every ```python block runs in a fresh interpreter, after its page's first python block (the client
  set-up), and must exit 0.
`localhost:8000` is replaced by the test server's address. A request constrained by a JSON Schema must
finish with "stop" and its output must validate against the schema; a regex-constrained one must match.
Nothing here depends on the exact text the models generate.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from tests.servers import ROOT, sse_events, start_server

DOCS = [ROOT / "docs" / "api.md", ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXPECT = re.compile(r"#\s*expect:\s*(\d{3})\b")
STATUS_MARK = "\n--status--"


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # where the command or block starts in the doc (1-based)
    kind: str  # "curl" or "python"
    code: str
    expect: int | None = None  # the status a `# expect:` line asks for; None: any 2xx
    setup: str = ""  # python: the page's first python block, run before this one

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def curl_commands(doc: Path, block: str, first_line: int) -> list[Example]:
    commands: list[list] = []  # [line, lines, expect]
    current, expect = None, None
    for offset, line in enumerate(block.splitlines()):
        if line.startswith("curl "):
            current = [first_line + offset, [line], expect]
            commands.append(current)
            expect = None
        elif line.lstrip().startswith("#") or not line.strip():
            current = None
            if m := EXPECT.match(line.strip()):
                expect = int(m.group(1))
        elif current is not None:
            current[1].append(line)
        else:
            raise ValueError(f"{doc.name}:{first_line + offset}: a line of a curl block that belongs to no "
                             f"curl command: {line!r}")
    return [Example(doc, line, "curl", "\n".join(lines), expect) for line, lines, expect in commands]


def examples(doc: Path) -> list[Example]:
    text = doc.read_text()
    found, setup = [], None
    for m in FENCE.finditer(text):
        lang, block = m.group(1), m.group(2)
        first_line = text.count("\n", 0, m.start(2)) + 1
        if lang == "bash" and "curl" in block:
            found += curl_commands(doc, block, first_line)
        elif lang == "python":
            found.append(Example(doc, first_line, "python", block, setup="" if setup is None else setup))
            setup = block if setup is None else setup
    return found


EXAMPLES = [e for doc in DOCS for e in examples(doc)]


def request_body(command: str) -> dict:
    """The JSON body a curl command sends (`-d '...'`), or {} when it sends none."""
    args = shlex.split(command.replace("\\\n", " "))
    for flag in ("-d", "--data", "--data-raw"):
        if flag in args:
            return json.loads(args[args.index(flag) + 1])
    return {}


def output_text(response: dict) -> str:
    if "text" in response:  # /v1/generate
        return response["text"]
    choice = response["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def finish_reason(response: dict) -> str:
    return response["finish_reason"] if "finish_reason" in response else response["choices"][0]["finish_reason"]


def check_structured(body: dict, response: dict) -> None:
    """A constrained request's output: complete, and what its schema or regex asks for."""
    response_format = body.get("response_format") or {}
    structured = body.get("structured_outputs") or {}
    schema = (response_format.get("json_schema", {}).get("schema") if response_format.get("type") == "json_schema"
              else structured.get("json"))
    if schema is not None:
        assert finish_reason(response) == "stop", response
        jsonschema.validate(json.loads(output_text(response)), schema)
    if "regex" in structured:
        assert finish_reason(response) == "stop", response
        assert re.fullmatch(structured["regex"], output_text(response)), response


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server({"base": ROOT / "models" / "base", "adapters": ROOT / "models"}, tmp_path_factory, "docs")
    yield srv
    srv.stop()


def test_the_docs_have_the_examples_this_test_checks():
    # Negative control for the extraction: a change of fences or markers must not leave this test with nothing.
    api = [e for e in EXAMPLES if e.doc.name == "api.md"]
    curls = [e for e in api if e.kind == "curl"]
    assert len(curls) >= 12 and len([e for e in api if e.kind == "python"]) >= 7
    assert all("localhost:8000" in e.code for e in curls)
    assert any(request_body(e.code).get("response_format", {}).get("type") == "json_schema" for e in curls)
    assert any(e.expect is not None and e.expect >= 400 for e in curls)
    assert [e for e in EXAMPLES if e.doc.name == "README.md" and e.kind == "curl"]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "curl"], ids=lambda e: e.id)
def test_curl_example(example: Example, server):
    assert shutil.which("curl"), "the docs' examples use curl: install it (apt-get install curl)"
    command = example.code.replace("localhost:8000", server.url.removeprefix("http://"))
    command = command.replace("curl ", f"curl --max-time 120 -w '{STATUS_MARK}%{{http_code}}' ", 1)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, f"{example.id}: exit {out.returncode}\n{out.stderr}"
    raw, _, status = out.stdout.rpartition(STATUS_MARK)
    status = int(status)
    body = request_body(example.code)
    if example.expect is not None:
        assert status == example.expect, f"{example.id}: {status} {raw}"
        assert "error" in json.loads(raw)
        return
    assert 200 <= status < 300, f"{example.id}: {status} {raw}"
    if body.get("stream"):
        events = sse_events(raw.encode())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and not any("error" in c for c in chunks), raw
    else:
        response = json.loads(raw)
        assert "error" not in response
        check_structured(body, response)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "python"], ids=lambda e: e.id)
def test_python_example(example: Example, server):
    code = f"{example.setup}\n{example.code}".replace("localhost:8000", server.url.removeprefix("http://"))
    env = {**os.environ, "OPENAI_API_KEY": "unused"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, f"{example.id}: exit {out.returncode}\n{out.stderr[-3000:]}"
