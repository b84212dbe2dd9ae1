"""A run's examples (issue #42): which ratings a run trained on, held out and dropped, with prompt, answer, thumb,
reason and comment, through GET /api/admin/runs/{id}/examples and the console's table, on the real DuckDB store
and the real app; vLLM is a stand-in (the browser test shows the table in Chromium)."""

from __future__ import annotations

import pytest

from app.web.admin_api import admin_headers
from app.web.auth import basic_header
from app.web.console import short_user
from tests.app import test_console_trust
from tests.app.test_console_trust import PASSWORD

AUTH = {"Authorization": basic_header("admin", PASSWORD)} | admin_headers()
ALICE, BOB = "rater-alice-0123456789abcdef", "bob"


stack, web = test_console_trust.stack, test_console_trust.web   # the fixtures: a real store, the real app


@pytest.fixture
def client(web):
    return web[0]


def _run_with_roles(stack, tmp_path) -> tuple[str, dict[str, str]]:
    """Six ratings in one snapshot: answer 0 held out, answer 1 dropped, the rest trained; answer i -> rating id."""
    store = stack.store
    conv = store.new_conversation(ALICE)
    for i in range(6):
        user = ALICE if i % 2 == 0 else BOB
        q = f"question {i}"
        m = store.add_user_message(conv, q)
        a = store.add_answer(conv, m, [{"role": "user", "content": q}], f"answer {i}", adapter="base")
        down = i in (1, 3)
        store.rate(user, a, "down" if down else "up", reason="wrong" if down else None,
                   comment="the capital is Paris" if i == 3 else None)
    run = store.start_run("operator", {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    store.export_snapshot(tmp_path / "snap.parquet", run_id=run)
    by_answer = {}
    for rid in store.run_examples(run, include_dropped=True):
        row = store._read("SELECT a.text FROM ratings r JOIN answers a ON a.id = r.answer_id WHERE r.id = ?", [rid])
        by_answer[row[0][0]] = rid
    store.finish_run(run, "rejected", metrics={}, heldout=[by_answer["answer 0"]], dropped=[by_answer["answer 1"]])
    return run, by_answer


def test_the_api_lists_a_runs_examples_by_role_with_what_was_rated(client, stack, tmp_path):
    run, by_answer = _run_with_roles(stack, tmp_path)
    r = client.get(f"/api/admin/runs/{run}/examples", headers=AUTH)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["counts"] == {"trained": 4, "heldout": 1, "dropped": 1} and page["total"] == 4
    assert sorted(e["answer"] for e in page["examples"]) == ["answer 2", "answer 3", "answer 4", "answer 5"]
    three = next(e for e in page["examples"] if e["answer"] == "answer 3")
    assert (three["prompt"], three["label"], three["reason"], three["comment"]) == (
        "question 3", "down", "wrong", "the capital is Paris")
    assert three["user"] == "bob" and three["rating_id"] == by_answer["answer 3"]
    two = next(e for e in page["examples"] if e["answer"] == "answer 2")
    assert two["user"] == short_user(ALICE) == "rater-alic…" and ALICE not in r.text   # shortened, never whole

    held = client.get(f"/api/admin/runs/{run}/examples?role=heldout", headers=AUTH).json()
    assert [e["answer"] for e in held["examples"]] == ["answer 0"] and held["total"] == 1
    dropped = client.get(f"/api/admin/runs/{run}/examples?role=dropped", headers=AUTH).json()
    assert [(e["answer"], e["label"], e["reason"]) for e in dropped["examples"]] == [("answer 1", "down", "wrong")]

    # pages: limit and offset walk the same order without overlap
    first = client.get(f"/api/admin/runs/{run}/examples?limit=3", headers=AUTH).json()["examples"]
    rest = client.get(f"/api/admin/runs/{run}/examples?limit=3&offset=3", headers=AUTH).json()["examples"]
    assert len(first) == 3 and len(rest) == 1
    assert {e["rating_id"] for e in first + rest} == {by_answer[f"answer {i}"] for i in (2, 3, 4, 5)}


def test_the_api_refuses_bad_queries_and_unknown_runs(client, stack, tmp_path):
    run, _ = _run_with_roles(stack, tmp_path)
    assert client.get(f"/api/admin/runs/{run}/examples?role=all", headers=AUTH).status_code == 400
    assert client.get(f"/api/admin/runs/{run}/examples?limit=0", headers=AUTH).status_code == 400
    assert client.get(f"/api/admin/runs/{run}/examples?offset=-1", headers=AUTH).status_code == 400
    assert client.get("/api/admin/runs/no-such-run/examples", headers=AUTH).status_code == 404


def test_the_api_needs_the_admin_login(client, stack, tmp_path):
    run, _ = _run_with_roles(stack, tmp_path)
    assert client.get(f"/api/admin/runs/{run}/examples").status_code == 401
    wrong = {"Authorization": basic_header("admin", "wrong")} | admin_headers()
    assert client.get(f"/api/admin/runs/{run}/examples", headers=wrong).status_code == 401


def test_the_console_table_says_how_many_of_how_many_it_shows(stack, tmp_path, monkeypatch):
    from app.loop.scheduler import RealignScheduler
    from app.web.console import EXAMPLE_COLUMNS, Operator

    run, _ = _run_with_roles(stack, tmp_path)
    op = Operator(stack.store, stack.registry, stack.realigner, RealignScheduler(stack.realigner, stack.store,
                                                                                stack.settings), stack.settings)
    assert op.run_choices()[0][1] == run and op.run_choices()[0][0].startswith(run[:8])
    running = stack.store.start_run("operator", {})   # snapshot taken, roles not yet known: not offered
    stack.store.export_snapshot(tmp_path / "snap2.parquet", run_id=running)
    assert [v for _, v in op.run_choices()] == [run]
    table, label = op.run_examples_table(run, "trained")
    assert list(table.columns) == EXAMPLE_COLUMNS and len(table) == 4
    assert label.startswith(f"Run {run[:8]}: trained on, all 4") and "held out 1" in label and "dropped 1" in label
    assert set(table["thumb"]) == {"👍", "👎"} and "the capital is Paris" in set(table["comment"])
    monkeypatch.setattr(Operator.run_examples, "__defaults__", ("trained", 2, 0))   # EXAMPLES_SHOWN = 2
    table, label = op.run_examples_table(run, "trained")
    assert len(table) == 2 and "the newest 2 of 4" in label
    assert op.run_examples_table(None)[1] == "Pick a run to see the ratings it used"


def test_both_engines_list_the_same_examples(tmp_path, pg_url):
    """The store query behind the API on DuckDB and on PostgreSQL: same counts, same rows in the same order."""
    from types import SimpleNamespace

    from feedback_store import FeedbackStore

    def rows(page: dict) -> list[tuple]:
        return [(e["prompt"], e["answer"], e["label"], e["user_id"], e["reason"], e["comment"])
                for e in page["examples"]]

    got = []
    for i, location in enumerate((tmp_path / "fb.duckdb", pg_url)):
        with FeedbackStore(location) as store:
            run, _ = _run_with_roles(SimpleNamespace(store=store), tmp_path / f"e{i}")
            pages = [store.run_example_rows(run, role, limit=3) for role in ("trained", "heldout", "dropped")]
            got.append([(page["counts"], rows(page)) for page in pages])
    assert got[0] == got[1] and got[0][0][0] == {"trained": 4, "heldout": 1, "dropped": 1}
