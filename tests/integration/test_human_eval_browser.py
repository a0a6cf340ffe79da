"""The rating page in a real headless Chromium, driven over the Chrome DevTools Protocol (a websocket:
no browser download, no driver binary). Tier `browser` (not in the default run):

    apt-get install -y chromium        # Debian's build; or point $CHROMIUM at any Chrome/Chromium
    pytest -m browser tests/integration/test_human_eval_browser.py

Ten pairs are rated with the keyboard shortcuts through `personafuse human-eval serve` (a real server
process); the browser is closed mid-way and reopened, and must resume at the next unrated pair. Then
`human-eval import` must put the unblinded results in the evaluate run's MLflow metrics.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from experiments.cli import main
from experiments.human_eval.study import unblind

pytestmark = [pytest.mark.browser, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
KEYS = {"a": ("KeyA", 65), "b": ("KeyB", 66), "t": ("KeyT", 84), "c": ("KeyC", 67), "Escape": ("Escape", 27)}


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium: apt-get install -y chromium (or set $CHROMIUM)")
    return found


class Browser:
    """One headless Chromium process and its first tab, spoken to over CDP."""

    def __init__(self, profile: Path) -> None:
        import websocket

        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)
        self.proc = subprocess.Popen([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._port(profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as resp:
            tab = next(t for t in json.loads(resp.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=20, suppress_origin=True)
        self.ids = itertools.count(1)

    def _port(self, path: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().splitlines()[0])
            assert self.proc.poll() is None, "chromium exited at start"
            time.sleep(0.1)
        raise TimeoutError("chromium wrote no DevToolsActivePort")

    def send(self, method: str, **params) -> dict:
        """One CDP command's result (events that arrive meanwhile are skipped)."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply["error"]
                return reply.get("result", {})

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {expression}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.querySelector('section:not(.hidden)')")

    def press(self, key: str) -> None:
        code, vk = KEYS[key]
        text = {"text": key} if len(key) == 1 else {}
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=vk,
                      **(text if kind == "keyDown" else {}))

    def close(self) -> None:
        """Like a rater closing the window: the process goes, nothing is flushed on purpose."""
        self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


SHOWN = "document.querySelector('#rate:not(.hidden) #pair') && document.getElementById('pair').dataset.pairId"
PROGRESS = "document.getElementById('progress').textContent"


def _answer(key: dict, pair_id: str) -> str:
    """The test rater's rule: a tie on the first overlap pair; else prompting, and gpt4o over base."""
    if pair_id == key["overlap_pairs"][0]:
        return "t"
    entry = key["pairs"][pair_id]
    wanted = "prompting" if "prompting" in entry["comparison"] else "gpt4o"
    return "a" if entry["a"] == wanted else "b"


def _rate(browser: Browser, key: dict, count: int, comment: str = "") -> list[str]:
    rated = []
    for _ in range(count):
        pair_id = browser.wait(SHOWN)
        if comment:
            browser.press("c")
            browser.send("Input.insertText", text=comment)
            browser.press("Escape")
            comment = ""
        browser.press(_answer(key, pair_id))
        browser.wait(f"document.getElementById('pair').dataset.pairId !== '{pair_id}' || "
                     "!document.getElementById('done').classList.contains('hidden')")
        rated.append(pair_id)
    return rated


@pytest.fixture(scope="module")
def served(evaluated_run, tmp_path_factory):
    run, _ = evaluated_run
    tmp = tmp_path_factory.mktemp("browser")
    records = json.loads((run / "evaluate/records/base/downstream.json").read_text())
    externals = []
    for name in ("gpt4o", "claude"):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"situation_id": r["item_id"], "reply": f"Outside reply {i}"})
                                                   + "\n" for i, r in enumerate(records)))
        externals += ["--external", f"{name}={tmp / f'{name}.jsonl'}"]
    out = tmp / "study"
    pairs = ["prompting:base", "prompting:gpt4o", "prompting:claude", "base:gpt4o"]
    assert main(["human-eval", "export", str(run), str(out), *[a for p in pairs for a in ("--pair", p)], *externals,
                 "--raters", "2", "--overlap", "0.25", "--seed", "5"]) == 0
    server = subprocess.Popen([sys.executable, "-m", "experiments.cli", "human-eval", "serve", str(out), "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = server.stdout.readline().split()[2]
    assert url.startswith("http://127.0.0.1:")
    yield run, out, url, tmp
    server.terminate()
    server.wait(timeout=30)


def test_rate_ten_pairs_close_and_resume_then_import(served, evaluated_run):
    run, out, url, tmp = served
    key, assignments = (json.loads((out / f).read_text()) for f in ("key.json", "assignments.json"))
    assert sorted(map(len, assignments.values())) == [5, 5]

    browser = Browser(tmp / "profile")
    browser.goto(f"{url}?rater=r1")
    first = _rate(browser, key, 3, comment="B sounds kinder")
    assert browser.js(PROGRESS) == "3 / 5"
    browser.close()  # mid-study
    assert len((out / "verdicts/r1.jsonl").read_text().splitlines()) == 3

    browser = Browser(tmp / "profile")
    browser.goto(f"{url}?rater=r1")
    assert browser.js(PROGRESS) == "3 / 5" and browser.wait(SHOWN) == assignments["r1"][3]  # resumes, nothing lost
    rest = _rate(browser, key, 2)
    assert browser.wait("!document.getElementById('done').classList.contains('hidden')")
    browser.goto(url)  # the start screen: the rater picks their name
    browser.wait("!!document.getElementById('rater-r2')")
    browser.js("document.getElementById('rater-r2').click()")
    browser.wait("location.search === '?rater=r2' && document.getElementById('progress').textContent === '0 / 5'")
    second = _rate(browser, key, 5)
    browser.close()
    assert first + rest == assignments["r1"] and second == assignments["r2"]

    verdicts = {r: [json.loads(line) for line in (out / f"verdicts/{r}.jsonl").read_text().splitlines()] for r in assignments}
    assert sum(map(len, verdicts.values())) == 10
    tally: dict[tuple, list[str]] = {}
    for rater, lines in verdicts.items():
        assert [v["pair_id"] for v in lines] == assignments[rater]
        for v in lines:
            assert v["choice"] == {"a": "A", "b": "B", "t": "tie"}[_answer(key, v["pair_id"])]
            winner = unblind(key, v["pair_id"], v["choice"])  # the key gives back the system the rule chose
            comparison = key["pairs"][v["pair_id"]]["comparison"]
            assert winner is None or winner == ("prompting" if "prompting" in comparison else "gpt4o")
            tally.setdefault(tuple(comparison), []).append("tie" if winner is None else "win" if winner == comparison[0] else "loss")
    assert verdicts["r1"][0]["comment"] == "B sounds kinder"

    assert main(["human-eval", "import", str(out)]) == 0
    run_id = json.loads((run / "evaluate/state.json").read_text())["run_id"]
    metrics = mlflow.MlflowClient(evaluated_run[1]).get_run(run_id).data.metrics
    for (left, right), outcomes in tally.items():
        name = f"human/{left}_vs_{right}"
        for outcome in ("win", "tie", "loss"):
            assert metrics[f"{name}/{outcome}_rate"] == pytest.approx(outcomes.count(outcome) / len(outcomes))
        assert metrics[f"{name}/win_rate_ci_low"] <= metrics[f"{name}/win_rate"] <= metrics[f"{name}/win_rate_ci_high"]
    assert metrics["human/kappa"] == pytest.approx(1.0) and metrics["human/kappa_items"] == 2
