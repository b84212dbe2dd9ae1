"""Admission control: the product's own requests give way to people chatting (serving/admission.py)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.loop.gate import http_ask
from serving.admission import Admission
from serving.client import ChatClient, SamplingParams


class Peak:
    """Counts concurrent holders; `peak` is the most seen at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def _background_burst(adm: Admission, n: int, hold_s: float, peak: Peak) -> list[threading.Thread]:
    def one():
        with adm.slot("background"), peak:
            time.sleep(hold_s)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_nobody_chatting_lets_every_background_request_through_at_once():
    adm = Admission(while_users=2, quiet_s=5.0)
    barrier = threading.Barrier(6, timeout=5)  # passes only if all six hold a place together

    def one():
        with adm.slot("background"):
            barrier.wait()

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not barrier.broken and adm.stats()["background_waits"] == 0


def test_while_a_user_chats_at_most_while_users_background_requests_run():
    adm = Admission(while_users=2, quiet_s=0.0)
    peak = Peak()
    user_in = threading.Event()
    release_user = threading.Event()

    def user():
        with adm.slot("user"):
            user_in.set()
            release_user.wait(10)

    tu = threading.Thread(target=user)
    tu.start()
    user_in.wait(5)
    threads = _background_burst(adm, 6, 0.05, peak)
    _wait_for(lambda: peak.peak >= 2)  # the threads have started (slow on a loaded machine)
    time.sleep(0.5)  # all six pass two at a time; without the limit they would have overlapped
    assert peak.peak == 2
    release_user.set()
    tu.join(5)
    for t in threads:
        t.join(5)
    assert all(not t.is_alive() for t in threads)
    st = adm.stats()
    assert st["in_flight"] == {"user": 0, "background": 0} and st["background_waits"] >= 1


def test_the_quiet_time_after_a_chat_keeps_the_limit_then_lifts_it():
    adm = Admission(while_users=1, quiet_s=0.4)
    with adm.slot("user"):
        pass
    assert adm.users_active()  # a person reading the answer is about to send the next message
    peak = Peak()
    t0 = time.monotonic()
    threads = _background_burst(adm, 4, 0.3, peak)
    for t in threads:
        t.join(5)
    # the first runs alone; once the quiet time is over the rest go together: ~0.3 + 0.3 s, not 4 x 0.3 s
    assert peak.peak >= 2 and time.monotonic() - t0 < 1.1
    assert not adm.users_active()


def test_a_user_request_is_never_held_back():
    adm = Admission(while_users=1, quiet_s=5.0)
    with adm.slot("user"), adm.slot("background"):
        done = threading.Event()

        def user():
            with adm.slot("user"):
                done.set()

        threading.Thread(target=user).start()
        assert done.wait(2)


def test_bad_settings_and_kinds_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Admission(while_users=0)
    with pytest.raises(ValueError, match="quiet_s"):
        Admission(quiet_s=-1)
    with pytest.raises(ValueError, match="kind"):
        with Admission().slot("warm_up"):
            pass
    with pytest.raises(ValueError, match="kind"):
        ChatClient("http://127.0.0.1:9").stream_chat([{"role": "user", "content": "hi"}], "base", kind="bulk")


class _SlowSSE(BaseHTTPRequestHandler):
    """A stand-in for vLLM's chat endpoint: streams a few chunks slowly (or answers once, when not streaming) and
    counts the requests in flight per model name; names starting with "bg-" are counted together as "bg"."""

    peaks: dict[str, Peak] = {}
    hold_s = 0.3

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = "bg" if body["model"].startswith("bg-") else body["model"]
        with self.peaks.setdefault(key, Peak()):
            if not body.get("stream"):
                time.sleep(self.hold_s)
                out = json.dumps({"choices": [{"message": {"content": "Paris"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for piece in ("a", "b", "c"):
                    time.sleep(self.hold_s / 3)
                    chunk = {"model": body["model"],
                             "choices": [{"delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client closed the stream (the user left)

    def log_message(self, *a):
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default backlog of 5 refuses a burst of connections
    daemon_threads = True


def _wait_for(cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


@pytest.fixture
def slow_server():
    _SlowSSE.peaks = {}
    srv = _Server(("127.0.0.1", 0), _SlowSSE)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _SlowSSE.peaks
    srv.shutdown()


def test_client_and_capability_probe_hold_back_behind_a_streaming_chat(slow_server):
    url, peaks = slow_server
    adm = Admission(while_users=2, quiet_s=0.0)
    client = ChatClient(url, admission=adm)
    chat = client.stream_chat([{"role": "user", "content": "hi"}], "user-chat", SamplingParams(max_tokens=3))
    assert next(chat) == "a"  # a person's answer is streaming now
    assert adm.stats()["in_flight"]["user"] == 1
    ask = http_ask(url, admission=adm)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ask("bg-probe", "capital of France?")))
               for _ in range(5)]
    threads += [threading.Thread(target=lambda: client.chat([{"role": "user", "content": "x"}], "bg-measure",
                                                            kind="background")) for _ in range(3)]
    for t in threads:
        t.start()
    _wait_for(lambda: "bg" in peaks and peaks["bg"].now == 2)
    time.sleep(0.5)  # without the limit all eight would be in flight together for most of this
    assert peaks["bg"].peak == 2  # the capability probe and the measurement share the two places
    assert chat.text() == "bc" and chat.result.model == "user-chat"  # the person's answer ends: no limit now
    for t in threads:
        t.join(10)
    assert results == ["Paris"] * 5 and adm.stats()["in_flight"] == {"user": 0, "background": 0}
    assert peaks["bg"].peak > 2  # the rest went together once nobody was chatting


def test_closing_a_stream_gives_its_place_back(slow_server):
    url, _ = slow_server
    adm = Admission(while_users=1, quiet_s=0.0)
    client = ChatClient(url, admission=adm)
    stream = client.stream_chat([{"role": "user", "content": "hi"}], "m")
    next(stream)
    assert adm.stats()["in_flight"]["user"] == 1
    stream.close()  # the user left mid-answer
    assert adm.stats()["in_flight"]["user"] == 0 and stream.result.finish_reason == "cancelled"
    unsent = client.stream_chat([{"role": "user", "content": "hi"}], "m", kind="background")
    unsent.close()  # closed before the first read: never held a place, never sent
    assert adm.stats()["in_flight"] == {"user": 0, "background": 0}
