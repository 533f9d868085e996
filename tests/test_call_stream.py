"""A call's stream (kaas_magic.call_stream, on the worker): a quick call's state never
travels on a message of its own (its reply says it all), a slow call's does, after
CallStream.STATE_AFTER_S, and a state waiting goes with the text after it, before it (the
caller's run view shows itself at the worker's first state); text is sent as it would be
after a state sent at once."""

from __future__ import annotations

import threading
import time

from kaas_magic.call_stream import CallStream


class Replier:
    def __init__(self):
        self.messages: list[list[tuple[str, str]]] = []
        self.sent = threading.Event()

    def write(self, message: dict) -> None:
        assert message["kind"] == "stream"
        self.messages.append(list(message["chunks"]))
        self.sent.set()


def test_a_quick_calls_state_is_never_sent():
    replier = Replier()
    stream = CallStream(replier)
    stream.write("state", "running")
    stream.finish()
    time.sleep(CallStream.STATE_AFTER_S + 0.1)  # the flusher's turn has come and gone
    assert replier.messages == []


def test_a_slow_calls_state_is_sent_after_state_after_s(monkeypatch):
    monkeypatch.setattr(CallStream, "STATE_AFTER_S", 0.05)
    replier = Replier()
    stream = CallStream(replier)
    started = time.monotonic()
    stream.write("state", "running")
    assert replier.sent.wait(5)
    assert time.monotonic() - started >= 0.04
    assert replier.messages == [[("state", "running")]]
    stream.write("state", "receiving")  # past STATE_AFTER_S: at once
    assert replier.messages[-1] == [("state", "receiving")]
    stream.finish()


def test_a_waiting_state_goes_with_the_text_after_it_which_waits_as_after_a_state_sent():
    replier = Replier()
    stream = CallStream(replier)
    started = time.monotonic()
    stream.write("state", "running")
    stream.write("stdout", "hello")  # coalesced for FLUSH_S, as after a state sent at once:
    stream.write("stdout", "\n")  # one print travels whole
    assert replier.sent.wait(5)
    assert time.monotonic() - started < CallStream.STATE_AFTER_S  # not held for the state
    assert replier.messages == [[("state", "running"), ("stdout", "hello"), ("stdout", "\n")]]
    stream.finish()
    assert len(replier.messages) == 1


def test_a_quick_calls_print_goes_whole_with_its_reply(monkeypatch):
    monkeypatch.setattr(CallStream, "FLUSH_S", 5.0)  # the call answers before the flusher's turn
    replier = Replier()
    stream = CallStream(replier)
    stream.write("state", "running")
    stream.write("stdout", "hello")
    stream.write("stdout", "\n")
    stream.write("state", "receiving")
    stream.finish()  # the state before the text goes with it (the caller's view shows first), the last does not
    assert replier.messages == [[("state", "running"), ("stdout", "hello"), ("stdout", "\n")]]


def test_text_after_a_state_is_coalesced_as_without_states(monkeypatch):
    monkeypatch.setattr(CallStream, "FLUSH_S", 5.0)  # the flusher does not come before finish
    replier = Replier()
    stream = CallStream(replier)
    stream.write("stdout", "a")  # the first text of a call: at once
    stream.write("state", "running")
    stream.write("stdout", "b")  # within FLUSH_S of the last send: waits for the flusher
    assert replier.messages == [[("stdout", "a")]]
    stream.write("state", "receiving")
    stream.finish()  # the answer: the text goes with the state before it; the last state does not
    assert replier.messages[-1] == [("state", "running"), ("stdout", "b")]
