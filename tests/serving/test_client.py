import pytest

from serving.client import ChatClient, SamplingParams, ServerUnavailable


def test_server_down_is_a_clear_error(free_port):
    client = ChatClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    stream = client.stream_chat([{"role": "user", "content": "hi"}], "base")
    with pytest.raises(ServerUnavailable, match="unavailable"):
        next(stream)
    assert stream.result is not None and stream.result.text == ""
    with pytest.raises(ServerUnavailable):
        client.models()


def test_closing_before_reading_sends_nothing_and_reports_cancelled(free_port):
    stream = ChatClient(f"http://127.0.0.1:{free_port()}").stream_chat([{"role": "user", "content": "hi"}], "kto-v3")
    stream.close()
    assert stream.result.finish_reason == "cancelled" and stream.result.model == "kto-v3"


def test_sampling_never_sends_a_seed():
    body = SamplingParams(temperature=0.0, max_tokens=5, stop=("\n",), extra={"seed": 1, "ignore_eos": True})
    req = body.to_request()
    assert "seed" not in req and req["stop"] == ["\n"] and req["ignore_eos"] is True
    assert not hasattr(SamplingParams(), "seed")
