"""docs/serve.md's curl examples, sent to a real server with a real key: each answers the
status its ``# -> STATUS`` comment says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx
import pytest

from kvshare.serve import ServeConfig
from kvshare.serve.auth import add_key

from serving import served

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"


def examples() -> list[tuple[int, str]]:
    """(expected status, curl command) of every example in the doc's Examples section."""
    section = DOC.read_text().split("## Examples", 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for status, command in re.findall(r"# -> (\d+)\n(curl .*?)(?=\n# ->|\Z)", block, re.S):
            out.append((int(status), command.replace("\\\n", " ")))
    return out


def parse_curl(command: str) -> tuple[str, str, dict[str, str], bytes | None]:
    """(method, url, headers, body) of a curl line using -s/-N, -H and -d only."""
    args = shlex.split(command)[1:]
    headers: dict[str, str] = {}
    data, url = None, None
    while args:
        arg = args.pop(0)
        if arg == "-H":
            name, _, value = args.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = args.pop(0).encode()
        elif arg.startswith("-"):
            assert set(arg[1:]) <= {"s", "N"}, f"unexpected curl option {arg}"
        else:
            url = arg
    assert url is not None
    return ("POST" if data is not None else "GET"), url, headers, data


def test_the_doc_has_examples_of_success_and_of_errors():
    statuses = [s for s, _ in examples()]
    assert len(statuses) >= 6 and {200, 400, 401} <= set(statuses)


def test_curl_examples_answer_as_documented(tiny_engine, tmp_path):
    keys = tmp_path / "keys.json"
    key = add_key(keys, "docs")
    with served(tiny_engine.fork(), ServeConfig(keys_file=str(keys))) as server:
        model = server.state.model_id
        for status, command in examples():
            command = command.replace("$KVSHARE_KEY", key).replace('"MODEL"', f'"{model}"')
            method, url, headers, data = parse_curl(command)
            url = url.replace("http://127.0.0.1:8000", server.base)
            r = httpx.request(method, url, headers=headers, content=data, timeout=60)
            assert r.status_code == status, (command, r.text)
            if "stream" in (data or b"").decode() and status == 200:
                assert r.text.rstrip().endswith("data: [DONE]")
        hint = server.state.engine.hints("picnic")[-1]
        assert hint.tenant == "docs" and hint.next == ("writer",)


@pytest.mark.parametrize("bad", ["curl -X DELETE http://x", "curl -o out http://x"])
def test_the_parser_refuses_what_it_does_not_understand(bad):
    with pytest.raises(AssertionError):
        parse_curl(bad)
