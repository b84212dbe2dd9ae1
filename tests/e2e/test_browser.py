"""End to end in real Chromium (Playwright) against `kto-loop run`: real vLLM server, real DuckDB file, real
aligner subprocess. The app runs on the tiny random model (vLLM serves it and the aligner trains on it, so both
use the same base model) to keep the test to a few minutes on 2 CPU cores.

Needs Debian's chromium (`apt-get install -y chromium`; `make test` installs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import psutil
import pytest

from app.web.admin_api import admin_headers
from app.web.auth import USER_COOKIE
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
RESULTS = Path(__file__).parents[1] / "results"
ADMIN = ("admin", "browser-test-pw")


HOLDOUT = 0.3


def seed_ratings(db: Path | str) -> tuple[int, int]:
    """A small earlier data set (user "seed"), so a run has held-out examples of both kinds for the gate."""
    from aligner.data import is_heldout
    from feedback_store import FeedbackStore

    store = FeedbackStore(db)
    conv = store.new_conversation("seed")
    split: dict[tuple[bool, bool], int] = {}
    i = 0
    while i < 8 or min(split.get(k, 0) for k in ((True, True), (True, False), (False, True), (False, False))) < 1:
        up = i % 2 == 0
        m = store.add_user_message(conv, f"seed question {i}")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"seed question {i}"}],
                             f"A helpful answer to question {i}." if up else "no", adapter="base")
        store.rate("seed", a, "up" if up else "down")
        key = (up, is_heldout(a, HOLDOUT))
        split[key] = split.get(key, 0) + 1
        i += 1
    c = store.counts()
    store.close()
    return c["up"], c["down"]


@pytest.fixture(scope="module")
def app_proc(tiny_model_dir, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    data = tmp_path_factory.mktemp("app-data")
    seeded = seed_ratings(data / "feedback.duckdb")
    port = free_port()
    env = dict(os.environ, KTO_LOOP_ADMIN_PASSWORD=ADMIN[1], KTO_LOOP_MAX_TOKENS="24",
               KTO_LOOP_ALIGN_EXTRA_ARGS=os.environ.get(
                   "KTO_TEST_ALIGN_ARGS", f"--max-steps 2 --batch-size 4 --holdout-fraction {HOLDOUT}"),
               KTO_LOOP_LORA_RANK="8", KTO_LOOP_PROMOTE_MIN_GAIN="-1000", KTO_LOOP_RATINGS_PER_MINUTE="1000")
    cmd = [sys.executable, "-m", "app.cli", "run", "--model-dir", str(tiny_model_dir), "--data-dir", str(data),
           "--port", str(port), "--vllm-port", "0"]
    log = open(data / "app.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("app exited during start-up:\n" + (data / "app.log").read_text()[-3000:])
        try:
            if httpx.get(url + "api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app did not come up:\n" + (data / "app.log").read_text()[-3000:])
    yield proc, url, data, seeded
    if proc.poll() is None:
        _stop(proc)
    log.close()


def _stop(proc: subprocess.Popen) -> list[int]:
    """Ctrl-C the app; return the pids of any descendants still alive afterwards (must be none)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    time.sleep(1)
    return [k.pid for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def _stats(url: str) -> dict:
    return httpx.get(url + "api/admin/stats", auth=ADMIN, timeout=10).json()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _save(page, name: str, full_page: bool = True) -> None:
    """A screenshot into tests/results (docs/screenshots holds reduced copies of some: docs/operations.md)."""
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / name), full_page=full_page)


def _rater_id(context) -> str:
    """The anonymous rater id of a browser context (its signed cookie, without the signature)."""
    return next(c["value"] for c in context.cookies() if c["name"] == USER_COOKIE).split(".")[0]


def test_conversations_persist_and_an_older_sibling_is_rated_by_its_id(app_proc, browser, tmp_path):
    """Chat, reload (still there), a second conversation, back to the first, regenerate, ‹ 1/2 ›, rate that one."""
    from playwright.sync_api import expect

    _, url, _, _ = app_proc
    context = browser.new_context(viewport={"width": 1200, "height": 950})
    page = context.new_page()
    page.goto(url)
    chat, convs, notice = page.locator("#kto-chat"), page.locator("#kto-convs"), page.locator("#kto-notice")
    first = "Keep this one <b>safe</b>"

    page.fill("#kto-input textarea", first)
    page.click("#kto-send")
    expect(notice).to_contain_text("Answered by", timeout=60_000)
    expect(convs.get_by_label(first)).to_be_checked(timeout=10_000)         # the title is text, not markup
    page.reload()
    expect(chat).to_contain_text("Keep this one", timeout=20_000)
    expect(convs.get_by_label(first)).to_be_checked()

    page.click("#kto-new")
    expect(chat).not_to_contain_text("Keep this one", timeout=10_000)
    page.fill("#kto-input textarea", "A second conversation")
    page.click("#kto-send")
    expect(convs.get_by_label("A second conversation")).to_be_checked(timeout=60_000)
    convs.get_by_label(first).check()
    expect(chat).to_contain_text("Keep this one", timeout=10_000)
    expect(chat).not_to_contain_text("A second conversation")
    older = chat.locator("[aria-label^=\"bot's message\"]").last.inner_text()

    page.click("#kto-regen")
    expect(page.locator("#kto-sibling")).to_contain_text("2/2", timeout=60_000)
    page.click("#kto-prev")
    expect(page.locator("#kto-sibling")).to_contain_text("1/2", timeout=10_000)
    expect(chat.locator("[aria-label^=\"bot's message\"]").last).to_have_text(older.strip())
    chat.get_by_role("button", name="Like", exact=True).last.click()
    expect(notice).to_contain_text("Thanks for the", timeout=10_000)
    _save(page, "siblings.png")

    # what the store holds (an online backup: the app keeps the file open): the 👍 is on the older answer's id
    backup = tmp_path / "copy.duckdb"
    r = httpx.post(url + "api/admin/backup", json={"download": True}, auth=ADMIN, headers=admin_headers(), timeout=60)
    assert r.status_code == 200, r.text[:300]
    backup.write_bytes(r.content)
    con = duckdb.connect(str(backup), read_only=True)
    rows = con.execute("""SELECT a.text, r.value FROM answers a JOIN conversations c ON c.id = a.conversation_id
                          JOIN messages m ON m.id = a.parent_id
                          LEFT JOIN ratings r ON r.answer_id = a.id AND r.user_id = c.user_id
                          WHERE c.user_id = ? AND m.content = ? ORDER BY a.created_at""",
                       [_rater_id(context), first]).fetchall()
    con.close()
    context.close()
    assert [v for _, v in rows] == ["up", None] and rows[0][0].strip() == older.strip()


def test_phone_width_thumbs_are_touch_sized_and_the_reason_panel_comes_into_view(app_proc, browser):
    """At 390×844 (a phone): 👍/👎 are at least 44×44 CSS px, the reason panel is in the viewport right after 👎
    without the user scrolling, Gradio's retry and trash icons (duplicates of Regenerate and New conversation)
    are not there, and nothing scrolls sideways."""
    from playwright.sync_api import expect

    _, url, _, _ = app_proc
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(url)
    chat = page.locator("#kto-chat")
    page.fill("#kto-input textarea", "Hello from a phone. Please answer at some length.")
    page.click("#kto-send")
    expect(page.locator("#kto-notice")).to_contain_text("Answered by", timeout=60_000)
    for name in ("Like", "Dislike"):
        box = chat.get_by_role("button", name=name, exact=True).last.bounding_box()
        assert box is not None and box["width"] >= 44 and box["height"] >= 44, (name, box)
    assert chat.get_by_role("button", name="Retry").count() == 0
    assert chat.locator("button[aria-label='Clear']:visible").count() == 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    page.evaluate("window.scrollTo(0, 0)")   # the worst case: the page at its top, the panel far below the fold
    chat.get_by_role("button", name="Dislike", exact=True).last.tap()
    panel = page.locator("#kto-down-panel").first
    expect(panel).to_be_visible(timeout=10_000)
    expect(panel).to_be_in_viewport(ratio=1.0, timeout=5_000)
    expect(page.locator("#kto-send-comment")).to_be_in_viewport()
    _save(page, "phone.png", full_page=False)   # what the phone shows, not the whole page
    page.locator("#kto-reason").get_by_label("too long").check()
    page.click("#kto-send-comment")
    expect(page.locator("#kto-notice")).to_contain_text("feedback was saved", timeout=10_000)
    context.close()


def test_chat_rate_realign_in_the_browser(app_proc, browser):
    from playwright.sync_api import expect

    proc, url, data, _ = app_proc
    before = _stats(url)              # what the store held before this test (the seed, earlier tests' ratings)
    seed_up, seed_down = before["up"], before["down"]
    page = browser.new_page(viewport={"width": 1200, "height": 950})
    page.goto(url)
    me = _rater_id(page.context)
    chat = page.locator("#kto-chat")

    def thumb(name):
        return chat.get_by_role("button", name=name, exact=True).last

    # bad input gets a friendly message, never a traceback
    page.fill("#kto-input textarea", "   ")
    page.click("#kto-send")
    expect(page.locator("#kto-notice")).to_contain_text("type a message", timeout=10_000)

    # 1. a streamed answer: the bot bubble grows, then the thumbs appear when it is stored
    page.fill("#kto-input textarea", "Hello! What is the capital of France?")
    page.click("#kto-send")
    expect(chat.get_by_label("user's message: Hello! What is the capital of France?")).to_be_visible(timeout=10_000)
    expect(page.locator("#kto-notice")).to_contain_text("Answered by base", timeout=60_000)
    first_text = chat.locator("[aria-label^=\"bot's message\"]").last.inner_text()
    assert first_text.strip()

    # 2. thumbs-up, withdraw, thumbs-down with a reason and a comment
    thumb("Like").click()
    expect(page.locator("#kto-notice")).to_contain_text("Thanks for the", timeout=10_000)
    thumb("Liked").click()
    expect(page.locator("#kto-notice")).to_contain_text("withdrawn", timeout=10_000)
    thumb("Dislike").click()
    expect(page.locator("#kto-down-panel").first).to_be_visible(timeout=10_000)
    page.locator("#kto-reason").get_by_label("inaccurate").check()
    page.fill("#kto-comment textarea", "not the right city")
    page.click("#kto-send-comment")
    expect(page.locator("#kto-notice")).to_contain_text("feedback was saved", timeout=10_000)

    # 3. regenerate: a new answer replaces the view; the old one keeps its thumbs-down in the store
    page.click("#kto-regen")
    expect(page.locator("#kto-notice")).to_contain_text("Answered by", timeout=60_000)
    thumb("Like").click()
    expect(page.locator("#kto-notice")).to_contain_text("Thanks for the", timeout=10_000)

    # 4. a second turn rated down, so a run has both classes
    page.fill("#kto-input textarea", "Tell me a joke.")
    page.click("#kto-send")
    expect(page.locator("#kto-notice")).to_contain_text("Answered by", timeout=60_000)
    expect(chat.get_by_role("button", name="Dislike", exact=True)).to_have_count(2, timeout=10_000)
    thumb("Dislike").click()
    expect(page.locator("#kto-down-panel").first).to_be_visible(timeout=10_000)
    _save(page, "chat.png")

    s = _stats(url)
    assert (s["up"], s["down"]) == (seed_up + 1, seed_down + 2), s

    # 5. a non-admin cannot open the console or its API
    anon = browser.new_context()
    assert anon.request.get(url + "admin/").status == 401
    assert anon.request.post(url + "api/admin/align", data={}).status == 401
    anon.close()

    # 6. the operator sees the counts, realigns, and a new adapter version gets served
    admin = browser.new_context(viewport={"width": 1280, "height": 1000},
                                http_credentials={"username": ADMIN[0], "password": ADMIN[1]})
    console = admin.new_page()
    console.goto(url + "admin/")
    summary = console.locator("#kto-summary")
    nxt = _stats(url)["next"]  # what the next run trains on: its snapshot less what the aligner holds out
    assert nxt["n_desirable"] + nxt["heldout_desirable"] == nxt["snapshot_desirable"] <= seed_up + 1, nxt
    assert nxt["n_undesirable"] + nxt["heldout_undesirable"] == nxt["snapshot_undesirable"] <= seed_down + 2, nxt
    expect(summary).to_contain_text(f"n_D = {nxt['n_desirable']}, n_U = {nxt['n_undesirable']}", timeout=20_000)
    _save(console, "next-run.png", full_page=False)
    console.click("#kto-realign")
    expect(console.locator("#kto-realign-msg")).to_contain_text("started", timeout=20_000)
    console.click("#kto-realign")  # a second trigger during the run is refused
    expect(console.locator("#kto-realign-msg")).to_contain_text("Not started", timeout=20_000)
    expect(summary).to_contain_text("promoted as kto-v1", timeout=300_000)
    expect(summary).to_contain_text("kto-v1", timeout=10_000)
    assert _stats(url)["served"] == "kto-v1"
    console.get_by_role("tab", name="Runs").click()
    expect(console.locator("#kto-runs")).to_contain_text("promoted", timeout=10_000)
    examples = console.locator("#kto-examples")   # the run's ratings: the newest run is picked by itself
    expect(examples).to_contain_text("trained on", timeout=30_000)
    expect(examples).to_contain_text("seed question")
    console.locator("#kto-ex-role").get_by_label("held out").check()
    expect(examples).to_contain_text("held out (the gate judged on them)", timeout=10_000)
    console.locator("#kto-ex-role").get_by_label("trained on").check()
    expect(examples).to_contain_text("trained on,", timeout=10_000)
    _save(console, "run-examples.png", full_page=False)
    console.get_by_role("tab", name="👎 reasons").click()
    expect(console.locator("#kto-reasons")).to_contain_text("not the right city", timeout=20_000)
    _save(console, "reasons.png", full_page=False)
    console.get_by_role("tab", name="Dashboard").click()
    time.sleep(4)
    _save(console, "dashboard.png")

    # the next answer comes from the new version
    page.click("#kto-new")
    page.fill("#kto-input textarea", "Hi again")
    page.click("#kto-send")
    expect(page.locator("#kto-notice")).to_contain_text("Answered by kto-v1", timeout=60_000)
    thumb("Like").click()
    expect(page.locator("#kto-notice")).to_contain_text("Thanks for the", timeout=10_000)
    admin.close()

    # 7. Ctrl-C stops everything (no orphan vLLM), then the DuckDB file holds exactly the final ratings
    assert _stop(proc) == []
    con = duckdb.connect(str(data / "feedback.duckdb"), read_only=True)
    rows = con.execute("""SELECT r.value, r.reason, r.comment, a.adapter, a.text FROM ratings r
                          JOIN answers a ON a.id = r.answer_id WHERE r.user_id = ?
                          ORDER BY r.created_at""", [me]).fetchall()
    n_answers = con.execute("SELECT count(*) FROM answers a JOIN conversations c ON c.id = a.conversation_id "
                            "WHERE c.user_id = ?", [me]).fetchone()[0]
    runs = con.execute("SELECT status, adapter_version FROM runs").fetchall()
    con.close()
    assert [r[0] for r in rows] == ["down", "up", "down", "up"]
    assert rows[0][1:3] == ("inaccurate", "not the right city") and rows[0][4].strip() == first_text.strip()
    assert [r[3] for r in rows] == ["base", "base", "base", "kto-v1"]
    assert n_answers == 4  # first answer, its regenerated sibling, the joke, the answer from kto-v1
    assert runs == [("promoted", "kto-v1")]

