"""`personafuse human-eval serve OUT`: the rating page on 127.0.0.1, standard library only.

The page (page.html, no external assets) asks the server for a rater's next unrated pair and posts
each verdict, which is saved before the page moves on; the verdict files are the only state, so a
closed browser or a restarted server resumes at the next unrated pair.

    GET  /                         the page (?rater=NAME; without it, a start screen lists the raters)
    GET  /api/raters               [{rater, total, done}]
    GET  /api/next?rater=NAME      {rater, total, done, pair: {pair_id, domain, conversation, a, b} | null}
    POST /api/verdict              {rater, pair_id, choice: A|B|tie, comment} -> the next state
"""
from __future__ import annotations

import json
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from experiments.human_eval.study import load_study
from experiments.human_eval.verdicts import add_verdict, read_verdicts

PAGE = Path(__file__).with_name("page.html")
HOST = "127.0.0.1"
"""Raters' verdicts and the replies stay on this machine: never bound to another interface."""


class Study:
    """A study folder as the page sees it: blinded pairs and assignments; no key, no system names."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        pairs, self.assignments = load_study(self.out)
        self.pairs = {p["pair_id"]: p for p in pairs}

    def state(self, rater: str) -> dict:
        assigned = self.assignments[rater]
        done = {v["pair_id"] for v in read_verdicts(self.out, rater, assigned)}
        todo = [p for p in assigned if p not in done]
        pair = None
        if todo:
            p = self.pairs[todo[0]]
            pair = {k: p[k] for k in ("pair_id", "domain", "conversation", "a", "b")}
        return {"rater": rater, "total": len(assigned), "done": len(done), "pair": pair}

    def rate(self, body: dict) -> dict:
        rater = body.get("rater")
        add_verdict(self.out, rater, self.assignments[rater], str(body.get("pair_id")), str(body.get("choice")),
                    str(body.get("comment") or ""))
        return self.state(rater)


class Handler(BaseHTTPRequestHandler):
    def __init__(self, *args, study: Study, **kwargs) -> None:
        self.study = study
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        if url.path == "/api/raters":
            return self._json(HTTPStatus.OK, [{k: s[k] for k in ("rater", "total", "done")}
                                              for s in map(self.study.state, self.study.assignments)])
        if url.path == "/api/next":
            rater = parse_qs(url.query).get("rater", [""])[0]
            return self._answer(lambda: self.study.state(self._rater(rater)))
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/api/verdict":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body must be JSON"})
        self._answer(lambda: self.study.rate({**body, "rater": self._rater(body.get("rater", ""))}))

    def _rater(self, rater: str) -> str:
        if rater not in self.study.assignments:
            raise LookupError(f"unknown rater '{rater}' (raters: {', '.join(self.study.assignments)})")
        return rater

    def _answer(self, make) -> None:
        """Errors as JSON the page shows: unknown rater 404, already rated 409, bad input 400."""
        try:
            self._json(HTTPStatus.OK, make())
        except LookupError as err:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(err)})
        except FileExistsError as err:
            self._json(HTTPStatus.CONFLICT, {"error": str(err)})
        except ValueError as err:  # includes DataError: a verdict file someone edited by hand
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    def _json(self, status: HTTPStatus, payload) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # one line per request would drown the URL
        pass


def make_server(out: str | Path, port: int = 8765) -> ThreadingHTTPServer:
    """The rating server for study folder `out` (port 0: any free port; see server.server_address)."""
    return ThreadingHTTPServer((HOST, port), partial(Handler, study=Study(out)))


def serve(out: str | Path, port: int = 8765) -> None:
    server = make_server(out, port)
    base = f"http://{HOST}:{server.server_address[1]}/"
    print(f"rating page: {base}  (Ctrl-C to stop; verdicts go to {Path(out) / 'verdicts'})", flush=True)
    for rater in server.RequestHandlerClass.keywords["study"].assignments:
        print(f"  {rater}: {base}?rater={rater}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
