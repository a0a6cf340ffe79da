"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1 that misbehaves on purpose.

The server answers /v1/chat/completions like vLLM would, but injects 429s, 500s, a reply slower
than the client timeout, malformed JSON, a permanent 500, a non-retryable 400 that echoes the API
key, and an answer that never parses. Every situation must end in persona_data.jsonl with each
response accepted or rejected with a reason, and the planted key must appear in no file.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from test_datagen import MESSAGES, POLES, read_jsonl, run_in_process, write_inputs

pytestmark = pytest.mark.integration

KEY_ENV = "PERSONAFUSE_TEST_TEACHER_KEY"
MAX_CONCURRENCY = 3
GRIEF, TECH = MESSAGES["grief"], MESSAGES["technical_help"]
# (step, situation text, pole or None) -> what the first attempts get; later attempts succeed.
FAULTS = {
    ("analysis", GRIEF[0], None): [429],
    ("pole", GRIEF[1], "agreeableness_low"): [500, 503],
    ("fused", GRIEF[2], None): ["sleep"],
    ("analysis", GRIEF[3], None): ["malformed", "no_choices"],
    ("pole", TECH[0], "neuroticism_high"): [500] * 10,  # never recovers
    ("fused", TECH[1], None): [400] * 10,  # not retryable
}
UNPARSEABLE = TECH[2]  # its analysis is always prose, never the line format
JUDGED_NO = ("pole", TECH[3], "agreeableness_high")


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.auth: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.auth.add(self.headers.get("Authorization", ""))
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        self.counted = True
        try:
            self._answer(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on the slow reply
            pass
        finally:
            self._uncount()

    def _uncount(self) -> None:
        with self.server.lock:
            self.server.in_flight -= self.counted
            self.counted = False

    def _answer(self, body: dict) -> None:
        key = request_key(body["messages"])
        with self.server.lock:
            attempt = self.server.attempts[key]
            self.server.attempts[key] += 1
        faults = FAULTS.get(key, [])
        fault = faults[attempt] if attempt < len(faults) else None
        if fault == "sleep":
            # The client abandons this request at its timeout while the server still sleeps: leave it
            # out of the in-flight count, which measures the client's concurrency.
            self._uncount()
            time.sleep(2.0)
            return self._send(200, completion("late"))
        if fault == "malformed":
            return self._send(200, b"{not json")
        if fault == "no_choices":
            return self._send(200, json.dumps({"id": "x", "choices": []}).encode())
        if fault == 400:  # a careless server echoing the credentials: the client must not keep them
            return self._send(400, f"bad request from {self.headers.get('Authorization')}".encode())
        if fault:
            return self._send(fault, b"busy", {"Retry-After": "0"})
        self._send(200, completion(reply(key, body["messages"])))

    def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def request_key(messages: list[dict]) -> tuple:
    system, text = messages[0]["content"], "\n".join(m["content"] for m in messages)
    situation = next(s for texts in MESSAGES.values() for s in texts if s in text)
    if "Trait Activation Theory" in system:
        return ("analysis", situation, None)
    if "YES or NO" in system:
        pole = re.search(r"Personality: (\w+)", messages[-1]["content"]).group(1)
        return ("judge", situation, pole)
    if "adapts to the situation" in system:
        return ("fused", situation, None)
    pole = next(p[0] for p in POLES if system.startswith(p[4]))
    return ("pole", situation, pole)


def reply(key: tuple, messages: list[dict]) -> str:
    step, situation, pole = key
    if step == "analysis":
        if situation == UNPARSEABLE:
            return "The user seems to need some help with their database."
        poles = re.findall(r"^(\w+): N$", messages[-1]["content"], re.M)
        return "CUES: a worried user; a concrete problem\n" + "\n".join(f"{p}: {3 + i}" for i, p in enumerate(poles))
    if step == "judge":
        return "NO" if ("pole", situation, pole) == JUDGED_NO else "YES"
    voice = next((p[3] for p in POLES if p[0] == pole), "Balanced and clear.")
    return (f"You said: {situation} {voice} That is the way I would answer it, and I hope that this "
            f"is of some use to you as a {pole or 'blend'} reply.")


def completion(text: str) -> bytes:
    return json.dumps({
        "id": "cmpl", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": len(text.split())},
    }).encode()


@pytest.fixture()
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_every_item_ends_accepted_or_rejected_and_the_key_leaks_nowhere(server, tmp_path, monkeypatch):
    planted = f"sk-planted-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, planted)
    config = write_config(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/v1")
    result = run_in_process(config)
    records = {r["id"]: r for r in read_jsonl(result["persona_data"])}
    assert len(records) == 8  # none lost
    by_text = {r["messages"][-1]["content"]: r for r in records.values()}
    for r in records.values():
        for entry in [*r["responses"].values(), r["fused"]]:
            assert entry["accepted"] == (not entry["flags"])
    assert by_text[GRIEF[0]]["teacher_label"] is not None  # after a 429
    assert by_text[GRIEF[1]]["responses"]["agreeableness_low"]["accepted"]  # after 500, 503
    assert by_text[GRIEF[2]]["fused"]["accepted"]  # after a timeout
    assert by_text[GRIEF[3]]["teacher_label"] is not None  # after malformed JSON and an empty completion
    lost = by_text[TECH[0]]["responses"]["neuroticism_high"]
    assert lost["flags"] == ["generation_error"] and "HTTP 500 (after 4 attempt(s))" in lost["error"]
    refused = by_text[TECH[1]]["fused"]
    assert refused["flags"] == ["generation_error"] and "(after 1 attempt(s))" in refused["error"]
    assert "<redacted>" in refused["error"]
    prose = by_text[UNPARSEABLE]
    assert prose["teacher_label"] is None and prose["analysis_attempts"] == 2
    assert prose["teacher_label_error"].startswith("unparseable")
    assert by_text[TECH[3]]["responses"]["agreeableness_high"]["flags"] == ["off_persona"]
    summary = result["summary"]
    assert summary["rejected"]["generation_error"] == 2
    assert summary["rejected"]["unparseable"] == 1 and summary["rejected"]["off_persona"] == 1
    assert summary["accepted"] == summary["responses"] - 3
    assert server.auth == {f"Bearer {planted}"}
    assert server.max_in_flight <= MAX_CONCURRENCY
    assert server.attempts[("pole", TECH[0], "neuroticism_high")] == 4
    assert_not_in_any_file(tmp_path, planted)


def write_config(folder: Path, base_url: str) -> Path:
    personas, situations = write_inputs(folder / "inputs")
    cfg = {
        "name": "openai_teacher_test",
        "stages": ["datagen"],
        "output_dir": str(folder / "out"),
        "personas": {"file": str(personas)},
        "data": {"situations": str(situations), "val_fraction": 0.25, "test_fraction": 0.25},
        "datagen": {
            "split": "all", "judge": True, "parse_retries": 1,
            "teacher": {"kind": "openai", "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                        "max_concurrency": MAX_CONCURRENCY, "timeout_s": 1.0, "max_retries": 3, "backoff_s": 0.01,
                        "batch_size": 4, "temperature": 0.0},
        },
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_not_in_any_file(root: Path, secret: str) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files) and any(p.name == "persona_data.jsonl" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
