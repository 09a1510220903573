"""The chat app with hostile or careless input (issue 9, cases 13-15 and `--port`): Stop holds for
a request that is still queued, text is never rendered as Markdown/HTML, a lone surrogate is one
clear sentence, and a bad port is one `error:` line before anything loads. The browser side of
these is in test_chat_browser.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import test_chat_session
from conftest import ROOT

from llama2_onnx.chat_format import Exchange
from llama2_onnx.chat_session import (
    ChatSettings,
    Conversation,
    request_answer,
    request_stop,
    respond,
)
from llama2_onnx.chat_ui import _take_message, shown_messages
from llama2_onnx.errors import GenerationError
from llama2_onnx.sampling import SamplingSettings

# test_chat_session's fixtures: a tiny exported chat variant and an engine pool over it.
chat_variant, pool = test_chat_session.chat_variant, test_chat_session.pool
LONG = ChatSettings(sampling=SamplingSettings(temperature=0), max_new_tokens=50)
SURROGATE = "the cat \ud800 sat"
HOSTILE = ('![pixel](http://127.0.0.1:9/x.png) <img src="http://127.0.0.1:9/y.png"> '
           '[click](http://127.0.0.1:9/) <script>alert(1)</script> & `<b>code</b>`')


# ---------------------------------------------------------------------------- case 13


def test_stop_pressed_while_queued_applies_to_that_request(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    request_answer(conv)  # Send pressed: the request waits in Gradio's queue ...
    request_stop(conv)    # ... and Stop is pressed before it starts
    answer = list(respond(pool, conv, "the cat sat", LONG))
    stats = pool.get(chat_variant).engine.last_stats
    assert stats.stop_reason == "stopped" and stats.new_tokens <= 1, stats
    assert conv.status.startswith("stopped") and len(conv.exchanges) == 1
    assert conv.exchanges[0].user == "the cat sat" and len(answer) <= 2
    # the Stop was used up: the next request runs normally
    request_answer(conv)
    list(respond(pool, conv, "the dog ran", LONG))
    assert pool.get(chat_variant).engine.last_stats.stop_reason != "stopped"
    conv.busy, conv.stop_requested = True, True  # an answer runs and Stop was just pressed:
    request_answer(conv)  # Send or Regenerate pressed meanwhile is refused, the Stop stays
    assert conv.stop_requested


# ---------------------------------------------------------------------------- case 14


def test_messages_are_shown_as_plain_text():
    conv = Conversation(exchanges=[Exchange(HOSTILE, answer=HOSTILE)])
    shown = shown_messages(conv)
    assert [m["role"] for m in shown] == ["user", "assistant"]
    for message in shown:
        assert "<" not in message["content"] and ">" not in message["content"]
        assert message["content"].replace("&lt;", "<").replace("&gt;", ">") \
            .replace("&amp;", "&") == HOSTILE
    assert conv.exchanges[0].answer == HOSTILE  # the history itself is unchanged


# ---------------------------------------------------------------------------- case 15


def test_lone_surrogate_is_one_clear_sentence(pool, chat_variant):
    conv = Conversation(variant=chat_variant)
    with pytest.raises(GenerationError, match="lone surrogate") as info:
        list(respond(pool, conv, SURROGATE, LONG))
    assert "U+D800" in str(info.value) and str(info.value).count(". ") == 0
    assert conv.exchanges == [] and not conv.busy
    with pytest.raises(GenerationError, match="system prompt .* lone surrogate"):
        ChatSettings(system=SURROGATE)


def test_page_keeps_a_message_it_cannot_send():
    conv = Conversation()
    box, sent, status = _take_message(conv, SURROGATE, "", unchanged="as it was")
    assert (box, sent) == ("as it was", None)
    assert status.startswith("error: the message contains") and "lone surrogate" in status
    box, sent, status = _take_message(conv, "the cat sat", SURROGATE, unchanged="as it was")
    assert (box, sent) == ("as it was", None) and "system prompt" in status


# ---------------------------------------------------------------------------- case 10: --port


def run_app(cwd, *args: str) -> str:
    """ChatApp/app.py's one `error:` line (exit code 2, no traceback)."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, str(ROOT / "ChatApp" / "app.py"), *args,
                           "--provider", "cpu"], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("port", ["-1", "0", "65536", "99999"])
def test_bad_port_is_one_error_line(tmp_path, port):
    assert run_app(tmp_path, "--port", port) == (f"error: --port {port} is not a port number; "
                                                 "pass one from 1 to 65535 (default 7860).")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_port_in_use_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = run_app(tmp_path, "--port", str(port))
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in line
