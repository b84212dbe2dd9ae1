"""The chat handlers against the real feedback store (a real DuckDB file).

The model side is a scripted stand-in for serving.ChatClient (these tests are about what the app records, not
about generation); the real vLLM path is covered by tests/e2e/test_browser.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import pyarrow.parquet as pq
import pytest

from app.web.chat import (
    MAX_LISTED,
    TITLE_CHARS,
    ChatService,
    InputError,
    Limits,
    PromptTokens,
    RatingError,
    Refused,
    byte_bound,
    clean_message,
    fit_context,
    title_of,
)
from feedback_store import FeedbackStore
from feedback_store.errors import UnknownConversation


@dataclass
class Result:
    model: str
    prompt_tokens: int = 7
    completion_tokens: int = 3
    finish_reason: str | None = "stop"


class ScriptedStream:
    def __init__(self, words, model, final: Result | None = None):
        self._it = iter(words)
        self.result = None
        self.model = model
        self.closed = False
        self._final = final  # the ChatResult at the end (default: a plain stop)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self.result = self._final or Result(self.model)
            raise

    def close(self):
        self.closed = True
        self.result = Result(self.model)


class ScriptedClient:
    def __init__(self):
        self.calls = []

    def stream_chat(self, messages, model, sampling=None):
        self.calls.append((messages, model))
        n = len(self.calls)
        return ScriptedStream([f"answer {n} ", "to ", messages[-1]["content"]], model)


class Registry:
    def __init__(self, name="base"):
        self.name = name

    def current(self):
        return self.name


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "fb.duckdb")
    yield s
    s.close()


def make_service(store, limit=60, registry=None):
    return ChatService(store, ScriptedClient(), registry or Registry(), system_prompt=lambda: "Be brief.",
                       sampling=lambda: {"temperature": 0.7}, max_chars=50, ratings_per_minute=limit)


def test_rating_through_handler_lands_in_duckdb_file(tmp_path):
    store = FeedbackStore(tmp_path / "fb.duckdb")
    svc = make_service(store, registry=Registry("kto-v3"))
    sess = svc.session("k1", "anon-0123456789abcdef")
    chunks = list(svc.send(sess, "What is 2+2?"))
    assert chunks[-1] == "answer 1 to What is 2+2?" and len(chunks) >= 3  # streamed, growing
    turn = svc.rate(sess, 1, True, chunks[-1])
    assert turn.rating == "up"
    store.close()

    con = duckdb.connect(str(tmp_path / "fb.duckdb"), read_only=True)
    rows = con.execute("""SELECT r.value, r.user_id, a.text, a.adapter, a.prompt_messages FROM ratings r
                          JOIN answers a ON a.id = r.answer_id""").fetchall()
    con.close()
    assert len(rows) == 1
    value, user, text, adapter, prompt = rows[0]
    assert (value, user, text, adapter) == ("up", "anon-0123456789abcdef", "answer 1 to What is 2+2?", "kto-v3")
    assert json.loads(prompt) == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 2+2?"}]


def test_withdraw_switch_comment_and_regenerate_keep_ratings_on_the_right_answer(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "hi"))
    first = sess.turns[1].msg_id
    svc.rate(sess, 1, True)
    svc.rate(sess, 1, "")                      # Gradio sends "" when the thumb is clicked again: withdraw
    assert store.get_rating("u1", first)["value"] is None
    svc.rate(sess, 1, False)
    svc.comment(sess, first, "inaccurate", "wrong\x07 facts")
    r = store.get_rating("u1", first)
    assert (r["value"], r["reason"], r["comment"]) == ("down", "inaccurate", "wrong facts")

    list(svc.regenerate(sess))                 # same slot, new answer; the old one stays as a sibling
    second = sess.turns[1].msg_id
    assert second != first and len(sess.turns) == 2
    assert {a["id"] for a in store.siblings(second)} >= {first, second}
    svc.rate(sess, 1, True)
    assert store.get_rating("u1", second)["value"] == "up"
    assert store.get_rating("u1", first)["value"] == "down"   # untouched by rating the regenerated answer

    # multi-turn context includes the earlier exchange, and undo never moves a rating
    list(svc.send(sess, "and then?"))
    assert [m["role"] for m in svc.client.calls[-1][0]] == ["system", "user", "assistant", "user"]
    svc.undo(sess)
    assert len(sess.turns) == 2 and sess.turns[1].msg_id == second
    assert store.counts()["up"] == 1 and store.counts()["down"] == 1


def test_rating_refuses_user_turns_stale_text_and_unknown_index(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "hi"))
    with pytest.raises(RatingError):
        svc.rate(sess, 0, True)                # the user's own message
    with pytest.raises(RatingError):
        svc.rate(sess, 5, True)
    with pytest.raises(RatingError):
        svc.rate(sess, 1, True, "some other text the browser showed")
    assert store.counts()["up"] == 0


def test_per_user_rate_limit(store):
    svc = make_service(store, limit=2)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "a"))
    svc.rate(sess, 1, True)
    svc.rate(sess, 1, False)
    with pytest.raises(RatingError, match="quickly"):
        svc.rate(sess, 1, True)
    assert store.get_rating("u1", sess.turns[1].msg_id)["value"] == "down"
    other = svc.session("k2", "u2")            # the limit is per user
    list(svc.send(other, "b"))
    svc.rate(other, 1, True)


@pytest.mark.parametrize("text,match", [("", "type a message"), ("   \n ", "type a message"),
                                        ("x" * 51, "limit is 50"), ("hi\x00there", "control character"),
                                        ("bell\x07", "U\\+0007")])
def test_bad_messages_get_friendly_errors_and_store_nothing(store, text, match):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    with pytest.raises(InputError, match=match):
        list(svc.send(sess, text))
    assert sess.turns == [] and sess.conv_id is None


def test_clean_message_keeps_newlines_and_tabs():
    assert clean_message("  line 1\n\tline 2  ", 100) == "line 1\n\tline 2"


def test_stop_keeps_the_partial_answer_and_it_can_be_rated(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    gen = svc.send(sess, "tell me a story")
    first = next(gen)
    sess.stop.set()
    rest = list(gen)
    assert rest[-1] == first                   # nothing after the stop
    ans = store.get_answer(sess.turns[1].msg_id)
    assert ans["text"] == first
    svc.rate(sess, 1, False)
    assert store.counts()["down"] == 1


def test_the_snapshot_knows_which_answers_the_model_did_not_end(store, tmp_path):
    """vLLM's finish reason is kept with the answer: one cut at max_tokens, or stopped, is trained without an
    end-of-turn (aligner/data.py), so the served model is not taught to stop mid-sentence."""
    client = ScriptedClient()
    svc = ChatService(store, client, Registry(), system_prompt=lambda: "", sampling=lambda: {"max_tokens": 50},
                      max_chars=500, ratings_per_minute=60)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "short"))
    assert store.get_answer(sess.turns[1].msg_id)["sampling"]["finish_reason"] == "stop"
    cut = Result("base", completion_tokens=2, finish_reason="length")  # vLLM says so, whatever the count
    client.stream_chat = lambda messages, model, sampling=None: ScriptedStream(["a long ", "answer"], "base", cut)
    list(svc.send(sess, "long"))
    gen = svc.send(sess, "stop me")
    next(gen)
    sess.stop.set()
    list(gen)
    for i in (1, 3, 5):
        svc.rate(sess, i, True)
    rows = pq.read_table(store.export_snapshot(tmp_path / "s.parquet").path).to_pylist()
    assert sorted((r["completion"], r["ended"]) for r in rows) == [("a long ", False), ("a long answer", False),
                                                                  ("answer 1 to short", True)]


def test_server_failure_removes_the_pending_turn(store):
    class Down:
        def stream_chat(self, *a, **k):
            raise ConnectionError("refused")

    svc = ChatService(store, Down(), Registry(), system_prompt=lambda: "", sampling=lambda: None, max_chars=50,
                      ratings_per_minute=5, health=lambda: False)
    sess = svc.session("k", "u1")
    with pytest.raises(ConnectionError):
        list(svc.send(sess, "hello"))
    assert sess.turns == [] and not svc.server_ok()


# ---------------------------------------------------------------- bounded work

def test_fit_context_leaves_out_the_oldest_exchanges_first():
    def count(msgs):                            # one token per character: easy to reason about
        return sum(len(m["content"]) for m in msgs)

    system = [{"role": "system", "content": "S" * 10}]
    turns = [
        {"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 20},
        {"role": "user", "content": "c" * 20}, {"role": "assistant", "content": "d" * 20},
        {"role": "user", "content": "e" * 20}]
    assert fit_context(system, turns, 110, count) == (system + turns, 0)          # fits: untouched
    msgs, dropped = fit_context(system, turns, 109, count)
    assert (msgs, dropped) == (system + turns[2:], 2)                             # one whole exchange out
    msgs, dropped = fit_context(system, turns, 50, count)
    assert (msgs, dropped) == (system + turns[4:], 4)                             # down to the last message
    with pytest.raises(InputError, match="too long for the model"):
        fit_context(system, turns, 29, count)


def test_prompt_tokens_uses_the_served_model_tokenizer_and_the_byte_bound_before(default_model_dir):
    import time

    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How far is the moon? " * 20}]
    assert PromptTokens(None)(msgs) == byte_bound(msgs)
    counter = PromptTokens(default_model_dir)
    deadline = time.monotonic() + 60
    while counter._tokenizer is None and time.monotonic() < deadline:
        time.sleep(0.05)
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    exact = len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert counter(msgs) == exact + PromptTokens.MARGIN < byte_bound(msgs)


def test_trimmed_answer_is_stored_with_the_prompt_the_model_saw(store):
    svc = ChatService(store, ScriptedClient(), Registry(), system_prompt=lambda: "Be brief.",
                      sampling=lambda: {"max_tokens": 50}, max_chars=500, ratings_per_minute=60,
                      context_tokens=450)
    sess = svc.session("k", "u1")
    for i in range(6):
        list(svc.send(sess, f"question {i} " + "x" * 80))
    sent = svc.client.calls[-1][0]
    assert byte_bound(sent) <= 450 - 50 and sent[-1]["content"].startswith("question 5")
    last = sess.turns[-1]
    assert last.dropped > 0 and last.dropped % 2 == 0
    assert store.get_answer(last.msg_id)["prompt_messages"] == sent


# ---------------------------------------------------------------- limits and sessions

def test_regenerate_is_charged_like_a_message(store):
    svc = ChatService(store, ScriptedClient(), Registry(), system_prompt=lambda: "", sampling=lambda: None,
                      max_chars=50, ratings_per_minute=60, limits=Limits(messages_per_minute=2))
    sess = svc.session("k", "u1")
    list(svc.send(sess, "hi"))
    list(svc.regenerate(sess))
    with pytest.raises(Refused, match="very quickly"):
        list(svc.regenerate(sess))
    assert len(svc.client.calls) == 2 and len(sess.turns) == 2


def test_a_session_key_belongs_to_its_user(store):
    svc = make_service(store)
    mine = svc.session("k", "u1", "203.0.113.7")
    list(svc.send(mine, "private"))
    theirs = svc.session("k", "u2", "203.0.113.7")      # the same page key under another id: not my session
    assert theirs is not mine and theirs.turns == []
    assert svc.session("k", "u1") is mine


def test_in_process_callers_have_no_per_address_session_cap(store):
    svc = ChatService(store, ScriptedClient(), Registry(), system_prompt=lambda: "", sampling=lambda: None,
                      max_chars=50, ratings_per_minute=60, limits=Limits(sessions_per_address=2))
    sims = [svc.session(f"sim-{i}", f"sim-{i}") for i in range(5)]       # the simulator passes no address
    assert all(svc.session(f"sim-{i}", f"sim-{i}") is s for i, s in enumerate(sims))
    web = [svc.session(f"w{i}", "u", "198.51.100.9") for i in range(3)]
    assert svc.session_count("198.51.100.9") == 2 and svc.session("w0", "u", "198.51.100.9") is not web[0]


# ---------------------------------------------------------------- stored conversations and siblings

def test_a_reload_lists_the_users_conversations_newest_first_and_continues_one(store):
    svc = make_service(store)
    page = svc.session("page-1", "u1")
    list(svc.send(page, "first question"))
    svc.rate(page, 1, True)
    svc.new_conversation(page)
    list(svc.send(page, "second question"))

    reloaded = make_service(store).session("page-2", "u1")     # a new page (and a restarted app): nothing in memory
    svc2 = make_service(store)
    listed = svc2.conversations(reloaded)
    assert [title for title, _ in listed] == ["second question", "first question"]
    svc2.open_conversation(reloaded, listed[1][1])
    assert [(t.role, t.content, t.rating) for t in reloaded.turns] == [
        ("user", "first question", None), ("assistant", "answer 1 to first question", "up")]
    answer = reloaded.turns[1].msg_id

    list(svc2.send(reloaded, "follow-up"))                     # continues the stored conversation
    assert [m["content"] for m in svc2.client.calls[-1][0]] == [
        "Be brief.", "first question", "answer 1 to first question", "follow-up"]
    nodes = store.user_conversation("u1", listed[1][1])
    follow = next(n for n in nodes if n["content"] == "follow-up")
    assert follow["parent_id"] == answer and len(nodes) == 4
    assert [c for _, c in svc2.conversations(reloaded)] == [listed[1][1], listed[0][1]]   # answered last: on top


def test_regenerated_answers_are_siblings_to_page_through_and_rate(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "hi"))
    older = sess.turns[1].msg_id
    list(svc.regenerate(sess))
    newer = sess.turns[1].msg_id
    list(svc.send(sess, "and then?"))                          # a follow-up under the newer answer
    assert svc.sibling_nav(sess) == (1, 2, 2)

    page = make_service(store).session("reload", "u1")
    svc2 = make_service(store)
    svc2.open_conversation(page, svc2.conversations(page)[0][1])
    assert [t.msg_id for t in page.turns][1] == newer and len(page.turns) == 4
    assert svc2.sibling_nav(page) == (1, 2, 2)
    with pytest.raises(InputError, match="no other version"):
        svc2.switch_answer(page, +1)
    shown = svc2.switch_answer(page, -1)
    assert shown.msg_id == older and shown.content == "answer 1 to hi"
    assert len(page.turns) == 2 and svc2.sibling_nav(page) == (1, 1, 2)   # the follow-up belongs to the newer one
    svc2.rate(page, 1, True, shown.content)
    assert store.get_rating("u1", older)["value"] == "up" and store.get_rating("u1", newer) is None

    back = svc2.switch_answer(page, +1)
    assert back.msg_id == newer and back.rating is None and page.turns[-1].content.endswith("and then?")
    svc2.switch_answer(page, -1)
    assert page.turns[1].rating == "up"                        # the stored rating shows on its own answer
    list(svc2.regenerate(page))                                # a third version, next to the two stored ones
    assert svc2.sibling_nav(page) == (1, 3, 3)


def test_nobody_lists_or_opens_another_users_conversation(store):
    svc = make_service(store)
    alice = svc.session("k", "anon-aaaaaaaaaaaaaaaa")
    list(svc.send(alice, "alice's secret"))
    mallory = svc.session("k", "anon-bbbbbbbbbbbbbbbb")
    assert svc.conversations(mallory) == []
    for bad in (alice.conv_id, "no-such-id", "", None, 42):
        with pytest.raises(InputError, match="not among yours"):
            svc.open_conversation(mallory, bad)
    assert mallory.turns == [] and mallory.conv_id is None
    list(svc.send(mallory, "mine"))
    assert mallory.conv_id != alice.conv_id and store.conversation(alice.conv_id)[-1]["content"].endswith("secret")
    with pytest.raises(UnknownConversation):
        store.user_conversation("anon-bbbbbbbbbbbbbbbb", alice.conv_id)


def test_the_list_is_bounded_and_titles_are_one_short_line_of_text(store):
    for i in range(MAX_LISTED + 5):
        conv = store.new_conversation("u1")
        m = store.add_user_message(conv, f"question {i}\n<b>in bold</b>\x1b[31m" + "x" * 300)
        store.add_answer(conv, m, [{"role": "user", "content": "q"}], "a")
    svc = make_service(store)
    listed = svc.conversations(svc.session("k", "u1"))
    assert len(listed) == MAX_LISTED
    title = listed[0][0]
    assert title.startswith("question 54 <b>in bold</b> [31mxxx") and title.endswith("x…")
    assert len(title) == TITLE_CHARS
    assert title_of("  ") == "(untitled)" and title_of("می\u200cخواهم") == "می\u200cخواهم"


def test_the_shown_conversation_is_not_swapped_while_an_answer_streams(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    list(svc.send(sess, "one"))
    first = sess.conv_id
    svc.new_conversation(sess)
    gen = svc.send(sess, "two")
    next(gen)
    for swap in (lambda: svc.open_conversation(sess, first), lambda: svc.new_conversation(sess)):
        with pytest.raises(InputError, match="wait for the answer"):
            swap()
    list(gen)
    assert sess.conv_id != first and [t.content for t in sess.turns][0] == "two"
    svc.open_conversation(sess, first)
    assert sess.turns[0].content == "one"


@pytest.mark.parametrize("text", ["family: 👨\u200d👩\u200d👧", "می\u200cخواهم بروم", "क्\u200dष"])
def test_joiners_are_accepted_and_stored_as_typed(store, text):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    list(svc.send(sess, text))
    assert store.user_conversation("u1", sess.conv_id)[0]["content"] == text


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200b", "\x1b"])
def test_other_invisible_and_bidi_override_characters_are_still_refused(char):
    with pytest.raises(InputError, match=f"U\\+{ord(char):04X}"):
        clean_message(f"abc{char}def\u200d", 100)


def test_the_arrows_page_through_the_answer_the_user_picked(store):
    svc = make_service(store)
    sess = svc.session("k", "u1")
    for q in ("one", "two"):
        list(svc.send(sess, q))
        list(svc.regenerate(sess))
    assert svc.sibling_nav(sess) == (3, 2, 2)                  # by default: the latest answer with versions
    svc.focus(sess, 0)                                         # a user message: nothing to page through
    assert svc.sibling_nav(sess) == (3, 2, 2)
    svc.focus(sess, 1)
    assert svc.sibling_nav(sess) == (1, 2, 2)
    svc.switch_answer(sess, -1)                                # the first version of answer one had no follow-up
    assert [t.content for t in sess.turns] == ["one", "answer 1 to one"] and svc.sibling_nav(sess) == (1, 1, 2)
    svc.switch_answer(sess, +1)
    assert [t.content for t in sess.turns][2:] == ["two", "answer 4 to two"]
