"""The LLM client and CAP's class descriptions, against a real, scripted HTTP server on 127.0.0.1 (no network,
no LLM): requests, retries, errors, the reply cache, description files, and where a CAP run's descriptions
come from.

Run: python -m pytest -q tests/test_llm.py
"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import cap
import common
import data
from cap import class_descriptions, load_descriptions
from common import LLMError, describe_classes, llm_complete, parse_descriptions

KEY = "sk-test-SECRET-0123456789"


def reply(*contents):
    """A chat-completions JSON body with one choice per content string."""
    return json.dumps(
        {"choices": [{"index": i, "message": {"role": "assistant", "content": c}} for i, c in enumerate(contents)]}
    )


@pytest.fixture
def server():
    """Start a server that answers request i with script[i] (the last entry repeats).

    Each entry is (status, content_type, body, delay_s[, body_delay_s]); body may be a callable of the
    request headers; delay_s is waited before the headers, body_delay_s between headers and body.
    Yields (url, script, seen), seen = one {"path", "headers", "body"} per request received.
    """
    script, seen = [], []

    class Handler(BaseHTTPRequestHandler):  # http.server's API is a class; nothing else in the project is
        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(raw)})
            status, ctype, body, delay, *body_delay = script[min(len(seen), len(script)) - 1]
            body = (body(self.headers) if callable(body) else body).encode()
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(sum(body_delay))
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout, oversized reply): expected in some tests
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script, seen
    httpd.shutdown()
    httpd.server_close()


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


OK = (200, "application/json", reply("1. a\n2. b"), 0)


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    """requests honours HTTP_PROXY; keep the loopback test server off any proxy set in the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# -----------------------------------------------------------------------------
# success, request format, key handling


def test_success_returns_every_choice_and_sends_an_openai_request(server, monkeypatch):
    url, script, seen = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script.append((200, "application/json", reply("one", "two", "three"), 0))
    out = llm_complete("describe a cat", url=url, model="m1", n=3, temperature=0.2, backoff=0)
    assert out == ["one", "two", "three"]
    req = seen[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"] == {
        "model": "m1",
        "messages": [{"role": "user", "content": "describe a cat"}],
        "n": 3,
        "temperature": 0.2,
    }
    assert "Authorization" not in req["headers"]
    assert req["headers"]["Content-Type"] == "application/json"


def test_key_is_sent_as_bearer_only_when_set_and_v1_is_not_doubled(server, monkeypatch):
    url, script, seen = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script.append(OK)
    llm_complete("p", url=url + "/v1/", model="m", backoff=0)
    assert seen[0]["path"] == "/v1/chat/completions"
    assert seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_fewer_choices_than_asked_is_fine(server):
    url, script, _ = server
    script.append((200, "application/json", reply("only one"), 0))  # llama.cpp/Ollama ignore n
    assert llm_complete("p", url=url, model="m", n=5, backoff=0) == ["only one"]


def test_key_never_appears_in_errors_or_cache_files(server, monkeypatch, tmp_path):
    url, script, _ = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def echo(h):
        return json.dumps({"error": {"message": f"bad request, you sent {h['Authorization']}"}})

    script += [OK, (400, "application/json", echo, 0), (401, "application/json", echo, 0)]
    llm_complete("p", url=url, model="m", cache_dir=tmp_path, backoff=0)
    messages = []
    for prompt in ["q", "r"]:
        with pytest.raises(LLMError) as e:
            llm_complete(prompt, url=url, model="m", cache_dir=tmp_path, retries=1)
        messages.append(str(e.value))
    assert "HTTP 400" in messages[0] and "***" in messages[0]  # the echoed key was blanked
    assert all(KEY not in m for m in messages)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(KEY not in p.read_text() for p in files)


# -----------------------------------------------------------------------------
# failures: each one is an LLMError with a clear message


def test_connection_refused_raises_llmerror():
    with pytest.raises(LLMError, match="cannot connect"):
        llm_complete("p", url=closed_port_url(), model="m", retries=2, backoff=0)


def test_backoff_doubles_between_attempts(monkeypatch):
    waits = []
    monkeypatch.setattr(common.time, "sleep", waits.append)  # no server thread in this test
    with pytest.raises(LLMError, match="after 4 attempts"):
        llm_complete("p", url=closed_port_url(), model="m", retries=4)
    assert waits == [0.5, 1.0, 2.0]


def test_429_is_retried_then_succeeds(server):
    url, script, seen = server
    script += [(429, "application/json", '{"error": "slow down"}', 0), OK]
    assert llm_complete("p", url=url, model="m", retries=3, backoff=0.01) == ["1. a\n2. b"]
    assert len(seen) == 2


def test_500_exhausts_the_retries(server):
    url, script, seen = server
    script.append((500, "text/plain", "internal error", 0))
    with pytest.raises(LLMError, match=r"HTTP 500 \(after 3 attempts\)"):
        llm_complete("p", url=url, model="m", retries=3, backoff=0.01)
    assert len(seen) == 3


def test_401_is_not_retried_and_points_at_the_key(server):
    url, script, seen = server
    script.append((401, "application/json", '{"error": "invalid key"}', 0))
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        llm_complete("p", url=url, model="m", retries=3, backoff=0.01)
    assert len(seen) == 1


@pytest.mark.parametrize(
    "status, ctype, body, match",
    [
        (200, "application/json", '{"choices": [', "malformed JSON"),
        (200, "application/json", '{"object": "chat.completion"}', "no 'choices'"),
        (200, "application/json", reply("", "   "), "empty content"),
        (200, "application/json", json.dumps({"choices": [{"message": {"content": None}}]}), "empty content"),
        (200, "text/html", "<html><body>Please log in</body></html>", "HTML page"),
        (404, "text/html", "<!DOCTYPE html><h1>Not Found</h1>", "HTML page"),
        (400, "application/json", '{"error": {"message": "model not found"}}', "HTTP 400.*model not found"),
    ],
)
def test_unusable_replies_raise_at_once(server, status, ctype, body, match):
    url, script, seen = server
    script.append((status, ctype, body, 0))
    with pytest.raises(LLMError, match=match):
        llm_complete("p", url=url, model="m", retries=3, backoff=0.01)
    assert len(seen) == 1


def test_oversized_reply_stops_reading(server):
    url, script, _ = server
    script.append((200, "application/json", reply("x" * 300_000), 0))
    with pytest.raises(LLMError, match="over 10000 bytes"):
        llm_complete("p", url=url, model="m", max_bytes=10_000, backoff=0)


def test_slow_server_times_out_quickly(server):
    url, script, seen = server
    script.append(OK[:3] + (3.0,))
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="timed out after 0.3s"):
        llm_complete("p", url=url, model="m", timeout=0.3, retries=2, backoff=0.01)
    assert time.monotonic() - t0 < 1.5 and len(seen) == 2


def test_server_stalling_after_its_headers_times_out_quickly(server):
    url, script, _ = server
    script.append(OK + (3.0,))
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="timed out after 0.3s"):
        llm_complete("p", url=url, model="m", timeout=0.3, retries=1)
    assert time.monotonic() - t0 < 1.0


# -----------------------------------------------------------------------------
# response cache


def test_cache_hit_makes_no_second_request(server, tmp_path):
    url, script, seen = server
    script.append(OK)
    first = llm_complete("p", url=url, model="m", cache_dir=tmp_path, backoff=0)
    second = llm_complete("p", url=url, model="m", cache_dir=tmp_path, backoff=0)
    assert first == second and len(seen) == 1
    (f,) = (tmp_path / "llm").glob("*.json")
    assert json.loads(f.read_text())["contents"] == first
    llm_complete("p", url=url, model="m", temperature=0.0, cache_dir=tmp_path, backoff=0)
    assert len(seen) == 2  # a different request is a different cache entry


@pytest.mark.parametrize("corrupt", ['{"contents": ["trunc', '{"contents": "not a list"}', "[]", ""])
def test_corrupt_cache_file_is_ignored_with_a_warning(server, tmp_path, capsys, corrupt):
    url, script, seen = server
    script.append(OK)
    llm_complete("p", url=url, model="m", cache_dir=tmp_path, backoff=0)
    (f,) = (tmp_path / "llm").glob("*.json")
    f.write_text(corrupt)
    assert llm_complete("p", url=url, model="m", cache_dir=tmp_path, backoff=0) == ["1. a\n2. b"]
    assert len(seen) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0]
    assert json.loads(f.read_text())["contents"] == ["1. a\n2. b"]  # rewritten


# -----------------------------------------------------------------------------
# descriptions: parsing, prompting, files, offline policy


@pytest.mark.parametrize(
    "text",
    [
        "Here are 3 descriptions:\n1. Woven threads.\n2) fine holes\n3. woven threads.\n\n",
        "- Woven threads.\n* fine holes\n• \n",
        '```json\n["Woven threads.", "fine holes", "", "WOVEN THREADS."]\n```',
    ],
)
def test_parse_descriptions_reads_numbered_bulleted_and_json_lists(text):
    assert parse_descriptions(text) == ["Woven threads.", "fine holes"]


def test_parse_descriptions_takes_plain_lines_when_there_is_no_list():
    assert parse_descriptions('"A white lacy pattern."\n\nThin threads.') == ["A white lacy pattern.", "Thin threads."]


def test_describe_classes_prompts_once_per_class_and_merges_choices(server):
    url, script, seen = server
    script += [
        (200, "application/json", reply("1. holes\n2. threads", "1. Holes\n2. veil\n3. mesh"), 0),
        (200, "application/json", reply("1. a\n2. b\n3. c\n4. d"), 0),
    ]
    out = describe_classes(["lacelike", "veined"], "texture", n=3, url=url, model="m", choices=2, backoff=0)
    assert out == {"lacelike": ["holes", "threads", "veil"], "veined": ["a", "b", "c"]}
    prompt = seen[0]["body"]["messages"][0]["content"]
    assert '"lacelike", a texture' in prompt and "3 short visual descriptions" in prompt and "numbered list" in prompt
    assert seen[0]["body"]["n"] == 2 and '"veined"' in seen[1]["body"]["messages"][0]["content"]


def test_load_descriptions_accepts_lists_and_single_strings(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"gauzy": "a thin veil", "pitted": [" small holes ", ""]}))
    assert load_descriptions(f) == {"gauzy": ["a thin veil"], "pitted": ["small holes"]}


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot read it as JSON"),
        ('["a", "b"]', "expected an object"),
        ('{"gauzy": 3}', "'gauzy' must map to"),
        ('{"gauzy": ["ok", 1]}', "'gauzy' must map to"),
    ],
)
def test_malformed_descriptions_file_is_a_user_error(tmp_path, content, match):
    f = tmp_path / "d.json"
    f.write_text(content)
    with pytest.raises(common.UserError, match=match) as e:
        load_descriptions(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_descriptions_file_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="nope.json"):
        load_descriptions(tmp_path / "nope.json")


def test_descriptions_file_wins_over_the_llm(server, tmp_path):
    url, script, seen = server
    script.append(OK)
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"gauzy": ["a thin veil"], "not-a-class": ["x"]}))
    out, source = class_descriptions(["gauzy", "pitted"], "texture", 5, url=url, model="m", descriptions_file=f)
    assert out == {"gauzy": ["a thin veil"]} and source == f"file {f}" and seen == []


def test_unreachable_llm_warns_once_and_returns_nothing(monkeypatch, capsys):
    monkeypatch.setattr(common.time, "sleep", lambda s: None)  # no server thread in this test
    assert class_descriptions(["gauzy"], "texture", 5, url=closed_port_url(), model="m") == ({}, "none")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(err) == 1 and "class-name prompts" in err[0]


def test_no_llm_and_no_file_warns_naming_the_flags(capsys):
    assert class_descriptions(["gauzy"], "texture", 5) == ({}, "none")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--llm-url/--llm-model" in err[0] and "--descriptions FILE" in err[0]


def test_unreachable_llm_falls_back_to_the_shipped_descriptions(monkeypatch, capsys):
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    shipped = {"gauzy": ["a thin veil of fabric"], "other": ["not asked for"]}
    out = class_descriptions(["gauzy"], "texture", 5, url=closed_port_url(), model="m", shipped=shipped)
    assert out == ({"gauzy": ["a thin veil of fabric"]}, "shipped")
    assert "shipped descriptions" in capsys.readouterr().err


def test_descriptions_file_wins_over_the_shipped_ones(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"gauzy": ["from the file"]}')
    out = class_descriptions(["gauzy"], "texture", 5, descriptions_file=path, shipped={"gauzy": ["shipped"]})
    assert out == ({"gauzy": ["from the file"]}, f"file {path}")


def test_descriptions_from_the_llm_name_the_model_as_their_source(server):
    url, script, seen = server
    script.append(OK)
    assert class_descriptions(["gauzy"], "texture", 5, url=url, model="m1") == ({"gauzy": ["a", "b"]}, "llm m1")
    assert len(seen) == 1


def test_without_an_llm_the_shipped_descriptions_are_used(capsys):
    out = class_descriptions(["gauzy"], "texture", 5, shipped={"gauzy": ["a thin veil"]})
    assert out == ({"gauzy": ["a thin veil"]}, "shipped") and "shipped descriptions" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# a CAP run records where its descriptions came from (results.json)

CLASSES = ["red", "green", "blue", "yellow"]  # --data synthetic
# --mismatch-t 4 = C: detection removes nothing, so every class is mismatched and described
TINY_CAP = [
    "--data",
    "synthetic",
    "--clip-model",
    "tiny",
    "--pretrained",
    "none",
    "--epochs",
    "1",
    "--iters",
    "1",
    "--batch-size",
    "8",
    "--mismatch-t",
    "4",
    "--quiet",
]


def cap_report(tmp_path, *extra):
    """cap.main on the tiny random CLIP -> results.json's concept_alignment."""
    cap.main([*TINY_CAP, "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run"), *extra])
    return json.loads((tmp_path / "run" / "results.json").read_text())["concept_alignment"]


def test_a_cap_run_with_a_descriptions_file_records_the_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({n: [f"a {n} thing"] for n in CLASSES}))
    report = cap_report(tmp_path, "--descriptions", str(f))
    assert report["descriptions_source"] == f"file {f}"
    assert report["chosen_descriptions"] == {n: f"a {n} thing" for n in CLASSES}


def test_a_cap_run_with_an_llm_records_the_model_and_asks_once_per_class(server, tmp_path):
    url, script, seen = server
    script.append((200, "application/json", reply("1. a plain thing\n2. a coloured thing"), 0))
    report = cap_report(tmp_path, "--llm-url", url, "--llm-model", "m1")
    assert report["descriptions_source"] == "llm m1"
    assert set(report["chosen_descriptions"]) == set(CLASSES)
    assert set(report["chosen_descriptions"].values()) <= {"a plain thing", "a coloured thing"}
    prompts = [r["body"]["messages"][0]["content"] for r in seen]
    assert len(prompts) == 4 and all(any(f'"{n}"' in p for p in prompts) for n in CLASSES)


def test_a_cap_run_whose_llm_is_unreachable_records_the_shipped_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "sleep", lambda s: None)  # no waits between the refused attempts
    shipped = {n: [f"a shipped {n} thing"] for n in CLASSES}
    monkeypatch.setitem(data.SHIPPED_DESCRIPTIONS, "synthetic", shipped)
    report = cap_report(tmp_path, "--llm-url", closed_port_url(), "--llm-model", "m1")
    assert report["descriptions_source"] == "shipped"
    assert report["chosen_descriptions"] == {n: f"a shipped {n} thing" for n in CLASSES}


def test_a_cap_run_without_any_descriptions_records_none(tmp_path, capsys):
    report = cap_report(tmp_path)
    assert report["descriptions_source"] == "none" and report["chosen_descriptions"] == {}
    assert "no class descriptions" in capsys.readouterr().err
