"""Human-eval parts that need no run: agreement against textbook values, assignments, reply files,
verdict files, and the rating server (real, on 127.0.0.1) on a study folder written by the exporter's writer."""
from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from datamodules.io import ConfigError, DataError
from experiments.human_eval.results import agreement, comparisons, kappa
from experiments.human_eval.server import make_server
from experiments.human_eval.study import _write_whole, assign, build_pairs, read_external, rater_names
from experiments.human_eval.verdicts import add_verdict, read_verdicts, verdict_path

SITUATIONS = {f"s{i}": {"id": f"s{i}", "domain": "grief", "messages": [{"role": "user", "content": f"hello {i}"}]}
              for i in range(6)}


def test_cohen_kappa_matches_the_textbook_example():
    """Wikipedia's Cohen example: 50 items, 20 both yes, 15 both no, 5 and 10 split -> kappa 0.4."""
    labels = [[0, 0]] * 20 + [[0, 1]] * 5 + [[1, 0]] * 10 + [[1, 1]] * 15
    assert kappa(labels, categories=2) == pytest.approx(0.4)


def test_fleiss_kappa_matches_the_textbook_example():
    """Wikipedia's Fleiss example: 10 subjects, 14 raters, 5 categories -> kappa 0.210."""
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    labels = [[c for c, n in enumerate(row) for _ in range(n)] for row in counts]
    assert kappa(labels, categories=5) == pytest.approx(0.210, abs=5e-4)


def test_agreement_uses_overlap_pairs_every_active_rater_rated():
    by_pair = {"p1": {"r1": "A", "r2": "A", "r3": "A"}, "p2": {"r1": "B", "r2": "B", "r3": "A"},
               "p3": {"r1": "tie", "r2": "tie"}, "p4": {"r1": "A"}}
    result = agreement(by_pair, ["p1", "p2", "p3"])
    assert (result["method"], result["items"], result["raters"]) == ("fleiss", 2, 3)
    two = agreement({p: {r: c for r, c in v.items() if r != "r3"} for p, v in by_pair.items()}, ["p1", "p2", "p3"])
    assert (two["method"], two["items"], two["kappa"]) == ("cohen", 3, pytest.approx(1.0))
    same = agreement({"p1": {"r1": "A", "r2": "A"}}, ["p1"])
    assert math.isnan(same["kappa"])  # chance agreement is total: undefined, not 1
    assert agreement(by_pair, [])["method"] == "none"


def test_assignments_overlap_and_split_the_rest():
    pairs = [f"p{i:04d}" for i in range(1, 21)]
    out, shared = assign(pairs, ["r1", "r2", "r3"], 0.3, seed=7)
    assert len(shared) == 6 and all(set(shared) <= set(ids) for ids in out.values())
    rest = [p for ids in out.values() for p in ids if p not in shared]
    assert sorted(rest) == sorted(set(pairs) - set(shared))  # every other pair exactly once
    assert max(map(len, out.values())) - min(map(len, out.values())) <= 1
    assert assign(pairs, ["r1", "r2", "r3"], 0.3, seed=7) == (out, shared)
    assert assign(pairs, ["r1", "r2", "r3"], 0.3, seed=8) != (out, shared)
    with pytest.raises(ConfigError, match="--overlap"):
        assign(pairs, ["r1"], 1.5, 0)


def test_rater_names():
    assert rater_names("3") == ["r1", "r2", "r3"] and rater_names("alice, bob") == ["alice", "bob"]
    for bad in ("a/b", "x,x", "0"):
        with pytest.raises(ConfigError, match="--raters"):
            rater_names(bad)


@pytest.mark.parametrize("lines,message", [
    (['{"situation_id": "s1", "reply": "hi"}', "{oops"], r"replies.jsonl:2: malformed JSONL"),
    (['{"situation_id": "s1", "reply": "hi"}', '{"situation_id": "s9", "reply": "x"}'], r"replies.jsonl:2: unknown situation id 's9'"),
    (['{"situation_id": "s1", "reply": "a"}', '', '{"situation_id": "s1", "reply": "b"}'], r"replies.jsonl:3: situation 's1' again \(first on line 1\)"),
    (['{"situation_id": "s1", "text": "a"}'], r"replies.jsonl:1: each line needs string keys"),
])
def test_external_reply_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "replies.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_external(path, SITUATIONS)


def _study(tmp_path, raters=("r1", "r2"), overlap=0.5):
    replies = {"x": {s: f"x says {s}" for s in SITUATIONS}, "y": {s: f"y says {s}" for s in list(SITUATIONS)[:4]}}
    blinded, key = build_pairs([("x", "y")], replies, SITUATIONS, seed=3)
    assignments, shared = assign([p["pair_id"] for p in blinded], list(raters), overlap, seed=3)
    out = tmp_path / "study"
    _write_whole(out, blinded, assignments, {"comparisons": [["x", "y"]], "overlap_pairs": shared, "pairs": key})
    return out, blinded, key, assignments


def test_pairs_are_blinded_and_the_key_unblinds_them(tmp_path):
    out, blinded, key, _ = _study(tmp_path)
    assert len(blinded) == 4  # only the situations both systems answered
    positions = {key[p["pair_id"]]["a"] for p in blinded}
    assert positions == {"x", "y"}  # seeded, but not always the same side
    for pair in blinded:
        entry = key[pair["pair_id"]]
        assert pair["a"] == f"{entry['a']} says {entry['situation_id']}" and pair["b"] == f"{entry['b']} says {entry['situation_id']}"
    assert "x" not in json.dumps([{k: v for k, v in p.items() if k not in ("a", "b")} for p in blinded])


def test_rates_follow_the_unblinded_verdicts(tmp_path):
    out, blinded, key, _ = _study(tmp_path)
    ids = [p["pair_id"] for p in blinded]
    x_side = lambda p: "A" if key[p]["a"] == "x" else "B"  # noqa: E731
    by_pair = {ids[0]: {"r1": x_side(ids[0]), "r2": x_side(ids[0])}, ids[1]: {"r1": "tie"},
               ids[2]: {"r1": "B" if x_side(ids[2]) == "A" else "A"}}
    (result,) = comparisons({"comparisons": [["x", "y"]], "pairs": key}, by_pair, samples=200, seed=0)
    assert (result.verdicts, result.pairs) == (4, 3)
    assert result.rates["win_rate"] == 0.5 and result.rates["tie_rate"] == 0.25 and result.rates["loss_rate"] == 0.25
    assert 0.0 <= result.rates["win_rate_ci_low"] <= 0.5 <= result.rates["win_rate_ci_high"] <= 1.0


def test_bad_verdict_lines_name_file_and_line_and_stay(tmp_path):
    out, blinded, _, assignments = _study(tmp_path)
    first, second = assignments["r1"][:2]
    path = verdict_path(out, "r1")
    for lines, message in [
        ([{"pair_id": first, "choice": "A"}, {"pair_id": first, "choice": "B"}], r"r1.jsonl:2: pair .* rated again \(first on line 1\)"),
        ([{"pair_id": first, "choice": "maybe"}], r"r1.jsonl:1: choice must be one of A, B, tie"),
        ([{"pair_id": "p9999", "choice": "A"}], r"r1.jsonl:1: pair 'p9999' is not in rater r1's assignment"),
    ]:
        text = "".join(json.dumps(v) + "\n" for v in lines)
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_verdicts(out, "r1", assignments["r1"])
        assert path.read_text() == text
    path.write_text(json.dumps({"pair_id": first, "choice": "A"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"r1.jsonl:2: malformed JSONL"):
        add_verdict(out, "r1", assignments["r1"], second, "B", "")  # the page refuses to build on a damaged file
    assert path.read_text().endswith("{broken\n")


def _call(base, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def server(tmp_path):
    out, blinded, key, assignments = _study(tmp_path)
    srv = make_server(out, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", out, assignments, key
    srv.shutdown()
    srv.server_close()


def test_server_binds_loopback_and_hides_system_names(server):
    base, out, assignments, key = server
    assert base.startswith("http://127.0.0.1:")
    status, state = _call(base, "/api/next?rater=r1")
    assert status == 200 and state["done"] == 0 and state["total"] == len(assignments["r1"])
    assert set(state["pair"]) == {"pair_id", "domain", "conversation", "a", "b"}
    with urllib.request.urlopen(base + "/", timeout=10) as resp:
        page = resp.read().decode()
    assert "<script>" in page and "http" not in page.replace("http-equiv", "")  # no external assets
    assert _call(base, "/api/next?rater=nobody")[0] == 404


def test_concurrent_posts_save_each_verdict_once_and_resume(server):
    base, out, assignments, _ = server
    pair = _call(base, "/api/next?rater=r1")[1]["pair"]["pair_id"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _call(base, "/api/verdict", {"rater": "r1", "pair_id": pair, "choice": "A"})[0],
                              range(8)))
    assert sorted(codes) == [200] + [409] * 7
    status, state = _call(base, "/api/verdict", {"rater": "r1", "pair_id": state_pair(base), "choice": "tie", "comment": " ok "})
    assert status == 200 and state["done"] == 2
    assert state["pair"]["pair_id"] == assignments["r1"][2]  # the next unrated one, in the rater's order
    saved = read_verdicts(out, "r1", assignments["r1"])
    assert [v["pair_id"] for v in saved] == assignments["r1"][:2] and saved[1]["comment"] == "ok"
    assert _call(base, "/api/verdict", {"rater": "r1", "pair_id": pair, "choice": "maybe"})[0] == 400


def state_pair(base):
    return _call(base, "/api/next?rater=r1")[1]["pair"]["pair_id"]
