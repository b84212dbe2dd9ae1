"""A user's own conversations on a real DuckDB file: listed newest first and bounded, opened only by their owner."""

from __future__ import annotations

import pytest

from feedback_store import FeedbackStore
from feedback_store.errors import InvalidInput, UnknownConversation


def exchange(store: FeedbackStore, conv: str, text: str, parent: str | None = None) -> tuple[str, str]:
    m = store.add_user_message(conv, text, parent_id=parent)
    return m, store.add_answer(conv, m, [{"role": "user", "content": text}], f"re: {text}")


def test_only_the_owners_answered_conversations_in_this_deployment_newest_first(tmp_path):
    store = FeedbackStore(tmp_path / "fb.duckdb")
    other = FeedbackStore(tmp_path / "fb.duckdb", deployment="other")
    try:
        old, new = store.new_conversation("u1", system_prompt="Be brief."), store.new_conversation("u1")
        exchange(store, old, "old one " + "x" * 500)
        exchange(store, new, "new one")
        store.new_conversation("u1")                                  # nothing answered: not listed
        exchange(store, store.new_conversation("u2"), "someone else's")
        exchange(other, other.new_conversation("u1"), "other deployment")
        listed = store.user_conversations("u1")
        assert [r["id"] for r in listed] == [new, old]
        assert listed[1]["first_message"] == ("old one " + "x" * 500)[:200]
        exchange(store, old, "again")                                 # answered last: first again
        assert [r["id"] for r in store.user_conversations("u1")] == [old, new]
        assert [r["id"] for r in store.user_conversations("u1", limit=1)] == [old]
        for bad in (0, -1, True, "5"):
            with pytest.raises(InvalidInput):
                store.user_conversations("u1", limit=bad)
    finally:
        other.close()
        store.close()


def test_a_conversation_opens_for_its_owner_only_with_their_own_ratings(tmp_path):
    store = FeedbackStore(tmp_path / "fb.duckdb")
    try:
        conv = store.new_conversation("u1", system_prompt="Be brief.")
        m, first = exchange(store, conv, "hi")
        second = store.add_answer(conv, m, [{"role": "user", "content": "hi"}], "hello again")
        store.rate("u1", first, "up")
        store.rate("u2", second, "down")                              # someone else's rating: not shown to u1
        nodes = store.user_conversation("u1", conv)
        assert [(n["role"], n["parent_id"], n["rating"]) for n in nodes] == [
            ("user", None, None), ("assistant", m, "up"), ("assistant", m, None)]
        for user, conv_id in (("u2", conv), ("u1", "nope"), ("u1", "")):
            with pytest.raises(UnknownConversation):
                store.user_conversation(user, conv_id)
    finally:
        store.close()
