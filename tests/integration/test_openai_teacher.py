"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1 that misbehaves on purpose.

The server answers /v1/chat/completions like vLLM would, but injects 429s, 500s, a reply slower
than the client timeout, malformed JSON, a permanent 500, a non-retryable 400 that echoes the API
key, and an answer that never parses. Every situation must end in persona_data.jsonl with each
response accepted or rejected with a reason, and the planted key must appear in no file.
"""
from __future__ import annotations

import base64
import json
import re
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
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

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.faults = FAULTS
        self.down_for: set[str] = set()  # situations whose every request gets a 503
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
        faults = self.server.faults.get(key, [])
        fault = faults[attempt] if attempt < len(faults) else None
        if key[1] in self.server.down_for:
            fault = 503
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


@contextmanager
def serving(port: int = 0):
    srv = FakeServer(port)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def server():
    with serving() as srv:
        yield srv


@pytest.mark.parametrize("secret_in", ["key_env", "url_and_oc_env"])
def test_every_item_ends_accepted_or_rejected_and_the_key_leaks_nowhere(server, tmp_path, monkeypatch, secret_in):
    """The key from api_key_env; or a password in the URL plus a served model name that comes from
    `${oc.env:...}` (an interpolated value is a secret by assumption): none of them in any file."""
    planted = f"sk-planted-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, planted)
    port = server.server_address[1]
    if secret_in == "key_env":
        config, expected_auth = write_config(tmp_path, f"http://127.0.0.1:{port}/v1"), f"Bearer {planted}"
    else:
        in_url, from_env = f"sk-url-{uuid.uuid4().hex}", f"model-{uuid.uuid4().hex}"
        monkeypatch.setenv("PERSONAFUSE_TEST_MODEL", from_env)
        config = write_config(tmp_path, f"http://u:{in_url}@127.0.0.1:{port}/v1", model="${oc.env:PERSONAFUSE_TEST_MODEL}")
        expected_auth = "Basic " + base64.b64encode(f"u:{in_url}".encode()).decode()  # userinfo wins over the bearer key
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
    assert server.auth == {expected_auth}
    assert server.max_in_flight <= MAX_CONCURRENCY
    assert server.attempts[("pole", TECH[0], "neuroticism_high")] == 4
    assert_not_in_any_file(tmp_path, planted)
    if secret_in != "key_env":
        assert_not_in_any_file(tmp_path, in_url)
        assert_not_in_any_file(tmp_path, from_env)
        assert records[by_text[GRIEF[0]]["id"]]["teacher"] == f"openai:***@http://127.0.0.1:{port}/v1"


def test_dead_teacher_fails_then_the_rerun_retries_only_what_failed(tmp_path, monkeypatch):
    """A closed port: exit 1, runs FAILED, nothing cached as done. The endpoint comes up failing one
    situation: exit 1 again, every other item done. Fixed: the rerun asks for that situation alone,
    finishes the same MLflow runs, and nothing else is regenerated."""
    import mlflow

    from experiments.cli import main

    monkeypatch.setenv(KEY_ENV, "sk-test")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the CLI's SIGTERM handler stays out of pytest
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{port}/v1")
    out, client = tmp_path / "out" / "datagen", mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["run", str(config)]) == 1  # connection refused on every request
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error_rate"] == 1.0 and summary["retry_items"] == 8
    state = json.loads((out / "state.json").read_text())
    parent = json.loads((tmp_path / "out" / "run_state.json").read_text())["run_id"]
    assert not state["complete"]
    assert {client.get_run(r).info.status for r in (state["run_id"], parent)} == {"FAILED"}
    with serving(port) as server:
        server.faults, server.down_for = {}, {GRIEF[1]}
        assert main(["run", str(config)]) == 1  # 5 of 40 replies unanswered: above max_error_fraction
        assert {key[1] for key in server.attempts} == {s for texts in MESSAGES.values() for s in texts}
        server.down_for, server.attempts = set(), Counter()
        done = {p.name: p.stat().st_mtime_ns for p in (out / "items").glob("*.json")}
        assert main(["run", str(config)]) == 0
        assert {key[1] for key in server.attempts} == {GRIEF[1]}  # only the failed item was asked for again
    rewritten = [name for name, mtime in done.items() if (out / "items" / name).stat().st_mtime_ns != mtime]
    assert len(rewritten) == 1
    final = json.loads((out / "state.json").read_text())
    assert final["complete"] and final["run_id"] == state["run_id"]  # the same MLflow run, resumed
    assert final["result"]["summary"]["retry_items"] == 0
    assert {client.get_run(r).info.status for r in (state["run_id"], parent)} == {"FINISHED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, base_url: str, model: str = "fake-teacher") -> Path:
    personas, situations = write_inputs(folder / "inputs")
    cfg = {
        "name": "openai_teacher_test",
        "stages": ["datagen"],
        "output_dir": str(folder / "out"),
        "personas": {"file": str(personas)},
        "data": {"situations": str(situations), "val_fraction": 0.25, "test_fraction": 0.25},
        "datagen": {
            "split": "all", "judge": True, "parse_retries": 1,
            "teacher": {"kind": "openai", "base_url": base_url, "model": model, "api_key_env": KEY_ENV,
                        "max_concurrency": MAX_CONCURRENCY, "timeout_s": 1.0, "max_retries": 3, "backoff_s": 0.01,
                        "batch_size": 4, "temperature": 0.0},
        },
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_not_in_any_file(root: Path, secret: str) -> None:
    """Every file the run wrote (outputs, the MLflow store and its artifacts): all but the config the test wrote."""
    files = [p for p in root.rglob("*") if p.is_file() and p != root / "experiment.yaml"]
    assert any(p.suffix == ".db" for p in files) and any(p.name == "persona_data.jsonl" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
