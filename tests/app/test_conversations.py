"""Stored conversations through the real app: Gradio's HTTP API with real signed-cookie identities, the real store.

A page load lists only the caller's own conversations and reopens the latest; another identity's conversation id
is refused. The model is the scripted stand-in of test_attacks_web (nothing here is about generation).
"""

from __future__ import annotations

from tests.app.test_attacks_web import A, B, Browser, make_app  # noqa: F401  (make_app: the fixture)


def texts(chat: dict) -> list[str]:
    """The message texts of a Chatbot update."""
    return ["".join(p["text"] for p in m["content"]) if isinstance(m["content"], list) else m["content"]
            for m in chat["value"]]


def choices(update: dict) -> list[tuple[str, str]]:
    return [(c[0], c[1]) for c in update["choices"]]


def raw_call(b: Browser, api: str, data: list, tab: str) -> str:
    """An event through Gradio's HTTP API, whatever it answers: the whole event stream as text."""
    r = b.request("POST", f"/gradio_api/call/{api}", json={"data": data, "session_hash": f"{b.name}-{tab}"})
    assert r.status_code == 200, r.text
    return b.request("GET", f"/gradio_api/call/{api}/{r.json()['event_id']}").text


def test_a_reload_restores_only_the_callers_own_conversations(make_app):  # noqa: F811  (the fixture)
    browser, st, _ = make_app()
    alice = browser(A)
    alice.visit()
    assert "Answered" in alice.send("alice: first <b>question</b>")
    alice.call("on_new", [None])
    assert "Answered" in alice.send("alice: second")

    page = alice.call("on_load", ["reloaded-page"], tab="t2")          # a reload: a new page, the same cookie
    listed = choices(page[2])
    assert [t for t, _ in listed] == ["alice: second", "alice: first <b>question</b>"]
    assert page[2]["value"] == listed[0][1] and texts(page[0]) == ["alice: second", "ok 2"]
    opened = alice.call("on_open", [listed[1][1], "reloaded-page"], tab="t2")
    assert texts(opened[0]) == ["alice: first <b>question</b>", "ok 1"]
    alice.call("on_send", ["alice: more", "reloaded-page"], tab="t2")          # continues the reopened one
    uid = alice.cookie.split(".")[0]
    assert [n["content"] for n in st.store.user_conversation(uid, listed[1][1])] == [
        "alice: first <b>question</b>", "ok 1", "alice: more", "ok 3"]
    assert [c["id"] for c in st.store.user_conversations(uid)] == [listed[1][1], listed[0][1]]

    mallory = browser(B)
    mallory.visit()
    page = mallory.call("on_load", ["m-page"])
    assert choices(page[2]) == [] and texts(page[0]) == []
    stolen = raw_call(mallory, "on_open", [listed[1][1], "m-page"], tab="t1")
    assert "alice" not in stolen and "ok 1" not in stolen     # refused: by the list's own choices, or by the store
    assert "not in the list of choices" in stolen or "not among yours" in stolen


def test_a_page_is_one_session_even_before_its_key_state_is_set(make_app):  # noqa: F811  (the fixture)
    """The key state is filled by a load event; a message sent before it ran, or the restoring load itself, must
    still land in the page's one session (Gradio's session hash), or the next event would find an empty chat."""
    browser, _, _ = make_app()
    b = browser(A)
    b.visit()
    assert "Answered" in b.call("on_send", ["quick, before the page key", None])[2]
    deps = b.request("GET", "/config").json()["dependencies"]
    key_load = next(d["api_name"] for d in deps if d["targets"] and d["targets"][0][1] == "load"
                    and not d["inputs"] and len(d["outputs"]) == 1 and d["api_name"].startswith("lambda"))
    b.call(key_load, [])                                                 # now the page's key state is set
    out = b.call("on_regen", [None])
    assert "Answered" in out[2] and texts(out[0])[0] == "quick, before the page key"
    assert "version **2/2**" in out[6]
