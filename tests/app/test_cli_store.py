"""`kto-loop export` and `kto-loop stats` against a real DuckDB file, including the file locked by the app."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from app.cli import export, stats
from app.config import add_config_arguments, config_from
from feedback_store import FeedbackStore

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"export": export, "stats": stats}


def main(argv: list[str]) -> int:
    """What app.cli does for one subcommand, so these tests do not depend on the other command modules."""
    module = COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"kto-loop {argv[0]}")
    module.add_arguments(parser)
    add_config_arguments(parser)
    args = parser.parse_args(argv[1:])
    return module.run(args, config_from(args, environ={}))


def make_db(path: Path, n_up: int = 5, n_down: int = 2) -> None:
    with FeedbackStore(path) as s:
        conv = s.new_conversation("alice", system_prompt="sys")
        for i in range(n_up + n_down):
            msg = s.add_user_message(conv, f"q{i}")
            a = s.add_answer(conv, msg, [{"role": "system", "content": "sys"}, {"role": "user", "content": f"q{i}"}],
                             f"a{i}")
            s.rate("alice", a, "up" if i < n_up else "down")


def test_stats_json_reports_counts_and_the_aligners_lambdas(tmp_path, capsys):
    from aligner.balance import auto_lambdas

    db = tmp_path / "fb.duckdb"
    make_db(db)
    assert main(["stats", "--json", "--db-path", str(db)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"up": 5, "down": 2, "withdrawn": 0, "total": 7}
    assert out["since_last_run"]["total"] == 7
    nxt = out["next_run"]  # answer ids are random, so which answers the hash slice holds out varies run to run
    assert (nxt["snapshot_desirable"], nxt["snapshot_undesirable"]) == (5, 2)
    assert nxt["heldout_desirable"] >= 1  # the per-kind floor holds a thumbs-up aside (25% of 5 rounds to 1)
    assert nxt["n_desirable"] + nxt["heldout_desirable"] == 5 and nxt["n_undesirable"] + nxt["heldout_undesirable"] == 2
    assert nxt["n_desirable"] >= 1 and nxt["n_undesirable"] >= 1  # both kinds always stay in training
    assert (nxt["lambda_d"], nxt["lambda_u"]) == auto_lambdas(nxt["n_desirable"], nxt["n_undesirable"])

    only_up = tmp_path / "up.duckdb"
    make_db(only_up, n_up=3, n_down=0)
    assert main(["stats", "--json", "--db-path", str(only_up)]) == 0
    nxt = json.loads(capsys.readouterr().out)["next_run"]
    assert nxt["lambda_d"] is None and "thumbs-down" in nxt["note"]


def test_export_kto_jsonl_and_parquet(tmp_path, capsys):
    db = tmp_path / "fb.duckdb"
    make_db(db)
    out = tmp_path / "kto.jsonl"
    assert main(["export", "--format", "kto", "--out", str(out), "--db-path", str(db)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_examples"] == 7 and summary["n_desirable"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and {r["label"] for r in rows} == {True, False}
    assert rows[0]["prompt"][0] == {"role": "system", "content": "sys"}
    assert rows[0]["completion"][0]["role"] == "assistant"

    pq_out = tmp_path / "kto.parquet"
    assert main(["export", "--out", str(pq_out), "--limit", "3", "--db-path", str(db)]) == 0
    capsys.readouterr()
    assert pq.read_table(pq_out).num_rows == 3

    snap = tmp_path / "snap.parquet"
    assert main(["export", "--format", "snapshot", "--out", str(snap), "--db-path", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"]
    assert pq.read_table(snap).column_names[:2] == ["example_id", "answer_id"]

    assert main(["export", "--out", str(tmp_path / "kto.txt"), "--db-path", str(db)]) == 1
    assert "jsonl or .parquet" in capsys.readouterr().err

    pairs = tmp_path / "pairs.jsonl"   # no answer here has a sibling: no pair (tests/app/test_export_trl.py has them)
    assert main(["export", "--format", "dpo", "--out", str(pairs), "--db-path", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["n_pairs"] == 0 and pairs.read_text() == ""
    assert main(["export", "--format", "dpo", "--out", str(tmp_path / "pairs.txt"), "--db-path", str(db)]) == 1
    assert "jsonl or .parquet" in capsys.readouterr().err


def test_locked_file_gives_one_line_error(tmp_path):
    db = tmp_path / "fb.duckdb"
    make_db(db)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from feedback_store import FeedbackStore
        s = FeedbackStore({str(db)!r})
        print("open", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "open"
        for cmd in (["stats", "--json"], ["export", "--out", str(tmp_path / "x.jsonl")]):
            argv = [*cmd, "--db-path", str(db)]
            code = f"import sys; from tests.app.test_cli_store import main; sys.exit(main({argv!r}))"
            r = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 1
            err = r.stderr.strip().splitlines()
            assert len(err) == 1 and "in use by another process" in err[0], r.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
