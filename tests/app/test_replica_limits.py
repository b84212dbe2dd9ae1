"""Rate limits across app replicas: on one PostgreSQL store every `kto-loop run` process takes from the same
buckets (feedback_store/limits.py), so two replicas together allow what one does; on the embedded DuckDB default
the buckets stay in the process's memory (no store write per event); a store that cannot be asked refuses.

The apps are what `create_app` builds, with the scripted model and HTTP helpers of tests/app/test_attacks_web.py."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import psycopg
import pytest

from app.web.auth import StoreBuckets, TokenBuckets, buckets_for
from app.web.chat import ChatService, Limits, RatingError, Refused
from feedback_store import FeedbackStore
from tests.app import test_attacks_web
from tests.app.test_attacks_web import A, B

make_app = test_attacks_web.make_app   # the fixture: apps on a test's store, PostgreSQL with db_url



def test_two_apps_on_one_postgres_store_share_each_limit(make_app, pg_url):
    browser1, st, _ = make_app(db_url=pg_url, messages_per_minute=3, address_new_ids_per_hour=2)
    browser2, _, _ = make_app(db_url=pg_url, messages_per_minute=3, address_new_ids_per_hour=2)
    here, there = browser1(A), browser2(A)
    assert here.visit() and there.visit()                 # the address's two new ids, one from each app
    assert browser1(A).visit() is None and browser2(A).visit() is None
    assert browser2(B).visit()                            # another address has its own
    there.cookie = here.cookie                            # one rater, its events balanced over both apps
    notices = [here.send("one"), there.send("two"), here.send("three"), there.send("four"), here.send("five")]
    assert ["Answered" in n for n in notices] == [True, True, True, False, False], notices
    assert all("very quickly" in n for n in notices[3:])
    assert st.store.rate_bucket_count() >= 2


def test_the_duckdb_default_keeps_its_limits_in_memory(make_app):
    browser, st, _ = make_app(messages_per_minute=2, address_new_ids_per_hour=1)
    b = browser(A)
    assert b.visit() and browser(A).visit() is None
    assert ["Answered" in b.send(f"m{i}") for i in range(3)] == [True, True, False]
    assert st.store.rate_bucket_count() == 0              # the limits held, and wrote nothing to the file


def _service(store, buckets, **limits) -> ChatService:
    from tests.app.test_chat import Registry as ChatRegistry
    from tests.app.test_chat import ScriptedClient

    return ChatService(store, ScriptedClient(), ChatRegistry(), system_prompt=lambda: "Be brief.",
                       sampling=lambda: {}, max_chars=200, ratings_per_minute=limits.pop("ratings_per_minute", 0),
                       limits=Limits(**limits), buckets=buckets)


def test_chat_services_on_one_postgres_store_share_rating_and_address_limits(pg_url):
    with FeedbackStore(pg_url) as s1, FeedbackStore(pg_url) as s2:
        limits = dict(ratings_per_minute=3, address_ratings_per_minute=4, address_messages_per_minute=4)
        one, two = _service(s1, buckets_for(s1, shared=True), **limits), _service(s2, buckets_for(s2, True), **limits)
        assert isinstance(one.limiter, StoreBuckets) and isinstance(_service(s1, buckets_for(s1, False)).limiter,
                                                                    TokenBuckets)
        a1, a2 = one.session("k", "anon-000000000000000a", A), two.session("k", "anon-000000000000000a", A)
        list(one.send(a1, "q1"))
        list(two.send(a2, "q2"))
        one.rate(a1, 1, True)
        two.rate(a2, 1, True)
        one.rate(a1, 1, False)
        with pytest.raises(RatingError, match="very quickly"):   # the rater's 3 per minute, over both services
            two.rate(a2, 1, False)
        b2 = two.session("k", "anon-000000000000000b", A)       # another rater at the same address
        list(two.send(b2, "q3"))
        two.rate(b2, 1, True)                                   # the address's 4th rating
        with pytest.raises(RatingError, match="your network"):
            two.rate(b2, 1, False)
        list(one.send(one.session("k2", "anon-000000000000000c", A), "q4"))   # the address's 4th message
        with pytest.raises(Refused, match="your network"):
            list(two.send(two.session("k2", "anon-000000000000000d", A), "q5"))


def test_a_store_that_cannot_be_asked_refuses_and_logs(pg_server, pg_url, caplog):
    store = FeedbackStore(pg_url)
    try:
        svc = _service(store, buckets_for(store, shared=True), messages_per_minute=5)
        sess = svc.session("k", "anon-000000000000000a", A)
        assert svc.messages.allow("anon-000000000000000a")
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:   # the database goes away
            admin.execute(f"DROP DATABASE {urlsplit(pg_url).path.lstrip('/')} WITH (FORCE)")
        with caplog.at_level(logging.WARNING, logger="kto_loop.auth"):
            with pytest.raises(Refused, match="very quickly"):
                list(svc.send(sess, "hello"))
        assert "rate limit messages refused an event: the store could not be asked" in caplog.text
        assert StoreBuckets(store, "messages", 0).allow("x")     # no limit needs no store
    finally:
        store.close()
