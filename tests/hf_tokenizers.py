"""Small Hugging Face tokenizers for the tests: byte-level BPE (GPT-2 style pieces) trained with
the `tokenizers` library on lines holding multi-byte characters, with the files a model folder
carries (tokenizer.json, tokenizer_config.json, generation_config.json) and chat templates
written here in the shapes real models use."""

from __future__ import annotations

import json
from pathlib import Path

LINES = [
    "the cat sat on the mat and the dog ran far away home",
    "héllo wörld, ça va? naïve café crème brûlée",
    "你好，世界。今天天气很好，我们去公园散步吧",
    "emoji: 🙂 🚀 👍🏽 and a family 👨‍👩‍👧 in one line",
    "Ελληνικά κείμενα και русский текст тоже здесь",
    "numbers 12345 and symbols <tag> {json: [1, 2]} done",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]

# Templates written for these tests in the shapes real models use.
CHATML = ("{% for message in messages %}"
          "{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a small test assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
          "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
             "{{ message['content'] | tojson }}{{ '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train(specials: list[str]):
    """A byte-level BPE tokenizer (GPT-2 style pieces) trained on LINES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(LINES * 20, trainer)
    return tokenizer


def write_tokenizer(folder: Path, kind: str = "chatml", template: str | None = None,
                    stops: object = None) -> Path:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json when `stops`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "chatml":  # SmolLM2's shape: no BOS added, <|im_end|> ends a turn
        tokenizer = train(SPECIALS)
        settings = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                    "chat_template": CHATML if template is None else template}
    else:  # Llama 3's shape: the post-processor puts <|begin_of_text|> first
        from tokenizers import processors

        tokenizer = train(LLAMA3_SPECIALS)
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                    "chat_template": [{"name": "default", "template": LLAMA3 if template is None
                                       else template}]}
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    if stops is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return folder / "tokenizer.json"
