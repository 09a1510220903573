"""The variant slots the distribution lists, and the command that fills each from Meta's weights."""

from __future__ import annotations

from dataclasses import dataclass

from .variant_folder import TOKENIZER


@dataclass(frozen=True)
class Slot:
    name: str
    size: str
    chat: bool
    precision: str

    @property
    def meta_folder(self) -> str:
        return f"llama-2-{self.size.lower()}" + ("-chat" if self.chat else "")

    @property
    def description(self) -> str:
        kind = "chat (fine-tuned for dialogue)" if self.chat else "pretrained (text completion)"
        precision = "int4 (4-bit weights, blocks of 32)" if self.precision == "int4" \
            else self.precision
        return f"Llama 2 {self.size} {kind}, {precision}"

    @property
    def command(self) -> str:
        """The one command that fills this slot from Meta's weights (<URL>: where to push)."""
        chat = " --chat" if self.chat else ""
        return (f"python tools/export_and_publish.py export --meta {self.meta_folder} "
                f"--tokenizer {TOKENIZER} --precision {self.precision} "
                f"--variant {self.name}{chat} --publish --remote <URL>")


SLOTS = tuple(
    Slot(f"{size}{'_FT' if chat else ''}_{precision}", size, chat, precision)
    for precision in ("float16", "float32", "int4")
    for size in ("7B", "13B")
    for chat in (False, True)
)
SLOT_NAMES = tuple(s.name for s in SLOTS)
