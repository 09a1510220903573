"""The Gradio chat page: variant choice, settings, streaming answers, Stop, and a status line.

The conversation logic lives in chat_session; this file only wires it to Gradio components.
Each browser tab gets its own `Conversation` (a `gr.State`), and all tabs share one
`EnginePool`, so a variant is loaded once and its engine is used by one answer at a time.
"""

from __future__ import annotations

import functools
import html
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat_session import (
    ChatSettings,
    Conversation,
    EnginePool,
    new_conversation,
    regenerate,
    remove_last,
    request_answer,
    request_stop,
    respond,
)
from .errors import UserError
from .placement import RunOptions
from .sampling import SamplingSettings
from .tokenizer import check_text
from .variant_folder import VariantState, pull_command
from .variants import describe, list_variants, resolve_variant

INSTALL_HINT = "the chat app needs Gradio; install it with `pip install -e .[chat]`."
UPDATE_EVERY_S = 0.05  # the page is refreshed at most this often while an answer streams
# Messages are shown as plain text (see `shown_messages`), so keep their line breaks.
CSS = ("#status { min-height: 1.5em; }\n"
       "#chat [data-testid=user], #chat [data-testid=bot] { white-space: pre-wrap; }")
# Defence in depth behind `shown_messages`: the page may load images, media, fonts and frames
# only from the app itself, so no text can make the browser fetch from elsewhere.
CONTENT_SECURITY_POLICY = ("img-src 'self' data: blob:; media-src 'self' data: blob:; "
                           "font-src 'self' data:; object-src 'none'; frame-src 'self'; "
                           "base-uri 'self'; form-action 'self'")
BUSY = "still answering the previous message; press Stop first."


@dataclass(frozen=True)
class AppOptions:
    """What the app serves: variants of `root`, `variant` first, placed as `run` asks."""

    root: Path
    variant: str | None = None
    run: RunOptions = RunOptions()  # where and how variants run
    token_delay: float = 0.0  # seconds to wait per token; only for tests and demos


def import_gradio():
    """Import gradio with its analytics off, or raise a UserError naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return gradio


def variant_choices(root: Path, explicit: str | None
                    ) -> tuple[list[tuple[str, str]], list[VariantState]]:
    """(label, value) of each ready variant, `explicit` first; and the slots that are not ready.

    Raises:
        VariantError: if `explicit` is neither a folder nor a slot of `root`.
    """
    states = list_variants(root)
    ready = [(s.name, s.name) for s in states if s.ready]
    if explicit and explicit not in {value for _, value in ready}:
        path = resolve_variant(explicit, root)
        label = path.name if path.parent.resolve() == root.resolve() else str(path)
        ready.insert(0, (label, explicit))
    return ready, [s for s in states if not s.ready]


def not_ready_help(states: list[VariantState]) -> str:
    """Markdown listing the slots that are not ready and how to get each."""
    lines = [f"- **{s.name}**: {s.state}" + (f" — {s.hint}" if s.hint else "") for s in states]
    return "\n".join(lines) or "Every variant slot is ready."


def no_variant_page(root: Path, states: list[VariantState]) -> str:
    """Markdown shown instead of the chat when no variant can be used."""
    first = states[0].name if states else "7B_FT_float16"
    return (f"## No variant is ready\n\nThe chat needs a model variant in `{root}`, and none is "
            "checked out (the small demo variant is missing too). Fetch one, for example:\n\n"
            f"```\ncd {root}\n{pull_command(first)}\n```\n\nor export one with "
            "`python tools/export_and_publish.py export ...`, then restart "
            "`python ChatApp/app.py`.\n\n### Variant slots\n\n" + not_ready_help(states))


def shown_messages(conv: Conversation) -> list[dict]:
    """The chat for the page, as plain text: model and user text is never rendered as
    Markdown or HTML, so it cannot load an image or other remote resource (a tracking or
    exfiltration channel), and a link stays text. Gradio still sanitises what it inserts."""
    return [{**message, "content": html.escape(message["content"], quote=False)}
            for message in conv.messages()]


def chat_settings(system: str, temperature: float, top_p: float, max_new_tokens: float,
                  max_history_tokens: float) -> ChatSettings:
    """ChatSettings from the page's controls (GenerationError for bad values)."""
    sampling = SamplingSettings(temperature=float(temperature), top_p=float(top_p))
    system = system if system and system.strip() else ""
    return ChatSettings(system=system, sampling=sampling,
                        max_new_tokens=int(max_new_tokens),
                        max_history_tokens=int(max_history_tokens))


class ChatHandlers:
    """The page's event handlers; each takes the tab's Conversation first."""

    def __init__(self, pool: EnginePool, options: AppOptions) -> None:
        self.pool, self.options = pool, options

    def answer(self, conv: Conversation, message: str | None, shown_status: str, variant: str,
               *controls) -> Iterator[tuple[list, str]]:
        """Send: stream the answer to `message` into the chat (None: nothing was sent, and
        `shown_status`, the status line, says why)."""
        if message is None:
            yield shown_messages(conv), shown_status
            return
        try:
            self._use_variant(conv, variant)
            steps = respond(self.pool, conv, message, chat_settings(*controls))
        except UserError as exc:
            steps = iter(())
            conv.status = f"error: {exc}"
        yield from self._stream(conv, steps)

    def again(self, conv: Conversation, variant: str, *controls) -> Iterator[tuple[list, str]]:
        """Regenerate: answer the last message again."""
        try:
            self._use_variant(conv, variant)
            steps = regenerate(self.pool, conv, chat_settings(*controls))
        except UserError as exc:
            steps = iter(())
            conv.status = f"error: {exc}"
        yield from self._stream(conv, steps)

    def _use_variant(self, conv: Conversation, variant: str) -> None:
        if not variant:
            raise UserError("choose a variant first.")
        if not conv.busy:
            conv.variant = str(resolve_variant(variant, self.options.root).resolve())

    def _stream(self, conv: Conversation, steps: Iterator[str]) -> Iterator[tuple[list, str]]:
        """Show the answer as it grows (at most every UPDATE_EVERY_S), then the final state."""
        shown = 0.0
        try:
            for _ in steps:
                if self.options.token_delay:
                    time.sleep(self.options.token_delay)
                if time.monotonic() - shown >= UPDATE_EVERY_S:
                    shown = time.monotonic()
                    yield shown_messages(conv), conv.status
        except UserError as exc:
            conv.status = f"error: {exc}"
        yield shown_messages(conv), conv.status

    def stop(self, conv: Conversation) -> None:
        request_stop(conv)

    def remove(self, conv: Conversation) -> tuple[list, str]:
        return self._edit(conv, remove_last, "removed the last turn")

    def clear(self, conv: Conversation) -> tuple[list, str]:
        return self._edit(conv, new_conversation, "new conversation")

    def _edit(self, conv: Conversation, change, done: str) -> tuple[list, str]:
        try:
            change(conv)
            conv.status = done
        except UserError as exc:
            conv.status = f"error: {exc}"
        return shown_messages(conv), conv.status


def build_app(options: AppOptions):
    """The Gradio Blocks of the chat page (the instructions page when no variant is ready).

    Raises:
        UserError: if Gradio is missing or `options.variant` names no variant.
    """
    choices, not_ready = variant_choices(options.root, options.variant)  # before Gradio loads
    gr = import_gradio()
    with gr.Blocks(title="Llama 2 chat (ONNX Runtime)") as app:
        gr.Markdown("# Llama 2 chat on ONNX Runtime")
        if not choices:
            gr.Markdown(no_variant_page(options.root, not_ready), elem_id="no-variant")
            return app
        pool = EnginePool(lambda path: _load(path, options))
        _chat_page(gr, ChatHandlers(pool, options), choices, not_ready)
    return app


def _load(path: str, options: AppOptions):
    from .generation import Engine

    return Engine.from_variant(Path(path), options.run)


def _chat_page(gr, handlers: ChatHandlers, choices: list[tuple[str, str]],
               not_ready: list[VariantState]) -> None:
    """Lay out the chat and wire its events."""
    conv = gr.State(_fresh_conversation)  # called once per browser tab
    variant = gr.Dropdown(choices, value=choices[0][1], label="Variant", elem_id="variant")
    root = handlers.options.root
    about_text, context = describe(resolve_variant(choices[0][1], root))
    about = gr.Markdown(about_text, elem_id="about")
    with gr.Accordion("Variants not ready yet", open=False):
        gr.Markdown(not_ready_help(not_ready))
    chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420,
                         render_markdown=False, latex_delimiters=[])
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             scale=5, elem_id="message")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
    with gr.Row():
        again = gr.Button("Regenerate", elem_id="regenerate")
        remove = gr.Button("Remove last turn", elem_id="remove")
        clear = gr.Button("New conversation", elem_id="new")
    status = gr.Markdown("", elem_id="status")
    controls = _settings_controls(gr, context or 4096)
    variant.change(functools.partial(_about, root=root), [variant], [about, controls[-1]],
                   queue=False)
    _wire(gr, handlers, conv, variant, chatbot, message, status, controls,
          dict(send=send, stop=stop, again=again, remove=remove, clear=clear))


def _fresh_conversation() -> Conversation:
    return Conversation()


def _about(variant: str, root: Path) -> tuple[str, int]:
    """The description line of the chosen variant, and its context as the history budget."""
    text, context = describe(resolve_variant(variant, root))
    return text, context or 4096


def _settings_controls(gr, history: int) -> list:
    with gr.Accordion("Settings", open=True):
        system = gr.Textbox(label="System prompt (chat variants; base variants continue it "
                            "as plain text)", lines=2, elem_id="system")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.6, step=0.05, label="Temperature (0: greedy)",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p", elem_id="top_p")
        with gr.Row():
            max_new = gr.Number(256, label="Max new tokens", precision=0, minimum=1,
                                elem_id="max_new_tokens")
            max_history = gr.Number(history, label="Max history tokens (also limited by the "
                                    "context minus max new tokens)", precision=0, minimum=1,
                                    elem_id="max_history_tokens")
    return [system, temperature, top_p, max_new, max_history]


def _wire(gr, handlers: ChatHandlers, conv, variant, chatbot, message, status, controls,
          buttons: dict) -> None:
    """Connect the buttons: Send/Enter and Regenerate stream; Stop runs at once (no queue)."""
    text = gr.State("")
    streamed = dict(outputs=[chatbot, status], concurrency_limit=4, concurrency_id="answer",
                    show_progress="hidden")
    take = functools.partial(_take_message, unchanged=gr.skip())
    for trigger in (buttons["send"].click, message.submit):
        trigger(take, [conv, message, controls[0]], [message, text, status], queue=False).then(
            handlers.answer, [conv, text, status, variant, *controls], **streamed)
    buttons["again"].click(request_answer, [conv], None, queue=False).then(
        handlers.again, [conv, variant, *controls], **streamed)
    buttons["stop"].click(handlers.stop, [conv], None, queue=False)
    buttons["remove"].click(handlers.remove, [conv], [chatbot, status], queue=False)
    for trigger in (buttons["clear"].click, chatbot.clear):  # the chat's trash icon too
        trigger(handlers.clear, [conv], [chatbot, status], queue=False)


def _take_message(conv: Conversation, message: str, system: str, unchanged: object = None
                  ) -> tuple[object, str | None, str]:
    """Empty the box at once (the answer streams in a queued step) and say it is on its way;
    from now on Stop applies to this request, also while it waits in the queue. While the
    tab is still answering, or when the text cannot be sent, send nothing, say why and leave
    the box as it is (`unchanged`: Gradio's no-update, as text that is not UTF-8 cannot even
    be sent back to the page)."""
    if conv.busy:
        return unchanged, None, BUSY
    try:
        check_text(message or "", "the message")
        check_text(system or "", "the system prompt")
    except UserError as exc:
        return unchanged, None, f"error: {exc}"
    request_answer(conv)
    return "", message, "sending ..."


def _theme(gr):
    """System fonts only: the page never fetches fonts from the internet."""
    return gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def check_port(port: int) -> None:
    """Refuse a port number no server can listen on (before anything is loaded).

    Raises:
        UserError: `port` is outside 1-65535.
    """
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number; pass one from 1 to 65535 "
                        "(default 7860).")


def launch(app, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve `app` until interrupted (local only unless `share`).

    Raises:
        UserError: the port is not a port number, or cannot be listened on (in use).
    """
    check_port(port)
    gr = import_gradio()
    from starlette.middleware import Middleware  # installed with Gradio

    app.queue(default_concurrency_limit=4)
    try:
        app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, quiet=not share,
                   inbrowser=False, theme=_theme(gr), css=CSS,
                   app_kwargs={"middleware": [Middleware(ContentSecurityPolicy)]})
    except OSError as exc:  # Gradio's "Cannot find empty port", or an address it cannot bind
        raise UserError(f"cannot listen on {host}:{port} ({str(exc).split('.')[0]}); pass "
                        "another --port or --host.") from None


class ContentSecurityPolicy:
    """ASGI middleware adding CONTENT_SECURITY_POLICY to every HTTP response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message) -> None:
            if message["type"] == "http.response.start":
                policy = (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
                message = {**message, "headers": [*message.get("headers", []), policy]}
            await send(message)

        await self.app(scope, receive, send_with_policy)
