"""Train the demo variant: a tiny Llama and its own SentencePiece tokenizer on the KJV Bible.

The corpus is the King James Version of the Bible (1611, public domain), read from the Debian
package `bible-kjv-text` through the `bible` program of the package `bible-kjv` (GPL-2+ program;
the text itself is public domain, see /usr/share/doc/bible-kjv-text/copyright). The result is a
float32 Hugging Face LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.model)
that tools/export_and_publish.py turns into the demo variant, or into a variant of any other
precision (--precision float16 or int4). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

# Run as `python tools/train_demo.py` from a checkout: make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2_onnx import safetensors_io  # noqa: E402
from llama2_onnx.checkpoints import canonical_shapes  # noqa: E402
from llama2_onnx.cli import run_main  # noqa: E402
from llama2_onnx.config import Config, write_text_atomic  # noqa: E402
from llama2_onnx.errors import UserError  # noqa: E402
from llama2_onnx.files import read_user_text  # noqa: E402
from llama2_onnx.reference import Transformer, greedy_tokens  # noqa: E402
from llama2_onnx.sampling import SamplingSettings, make_rng, sample_token  # noqa: E402
from llama2_onnx.staging import check_tool_out, claim_tool_out  # noqa: E402
from llama2_onnx.synthetic import hf_config_dict, hf_name  # noqa: E402

BIBLE_RANGE = "Gen1:1-Rev22:21"
KJV_VERSES = 31102
# One line of `bible -f`: book abbreviation, chapter:verse, text ("1Sm3:4 That the LORD...").
VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+\d+):\d+ (.+)$")
PROMPTS = ("In the beginning", "And the LORD said unto Moses,", "Blessed are the")
# What save_checkpoint writes into --out (a new or empty folder, or one a tool wrote before).
OUT_FILES = ("config.json", "model.safetensors", "tokenizer.model", "training.json")
CORPUS_FIX = f"create it with `bible -f {BIBLE_RANGE} </dev/null > {{path}}`"
# SentencePiece's pieces besides the corpus' characters: <unk>, <s>, </s> and 256 bytes.
SPECIAL_PIECES = 3 + 256

EPILOG = f"""\
corpus: King James Version of the Bible (1611), public domain (in the UK the Crown's letters
  patent still govern printing it). Install it with `apt-get install bible-kjv` (Debian/Ubuntu;
  it pulls in the text package bible-kjv-text, 4.38 on Debian 12). The `bible` program is GPL-2+,
  the text is public domain. On a machine without the package, extract the text elsewhere with
  `bible -f {BIBLE_RANGE} </dev/null > kjv.txt` and pass --corpus kjv.txt.
CPU (defaults, about 15-20 minutes on 2 cores): python tools/train_demo.py --out /tmp/demo_train
GPU (under a minute on one H100): python tools/train_demo.py --out /tmp/demo_train --device cuda \\
      --steps 1200 --batch-size 16 --seq-len 512 --eval-every 50
The corpus is about 1.1M tokens: past ~10 passes over it the model memorises (validation loss
rises), so more steps do not help; the weights with the lowest validation loss are saved.
"""


@dataclass
class Corpus:
    """Training text: chapters, each a list of verses (without their references)."""

    chapters: list[list[str]]
    source: str

    @property
    def verses(self) -> list[str]:
        return [verse for chapter in self.chapters for verse in chapter]


def read_corpus(path: Path | None) -> Corpus:
    """Read the KJV text from `path` (output of `bible -f`) or from the installed package.

    Raises:
        UserError: naming the package to install when neither is available, or when the
            file is not the text `bible -f` writes.
    """
    if path is not None:
        text = read_user_text(path, "--corpus", CORPUS_FIX.format(path=path))
        return parse_bible_lines(text, str(path))
    program = shutil.which("bible")
    if program is None:
        raise UserError("the `bible` program is missing: run `apt-get install bible-kjv` "
                        "(King James Bible, public domain) or pass --corpus FILE.")
    result = subprocess.run([program, "-f", BIBLE_RANGE], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, check=True)
    version = package_version("bible-kjv-text")
    return parse_bible_lines(result.stdout, f"Debian package bible-kjv-text {version} via `bible`")


def package_version(package: str) -> str:
    """The installed Debian package's version, for the record in training.json."""
    if shutil.which("dpkg-query") is None:
        return "(version unknown)"
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "(version unknown)"


def parse_bible_lines(text: str, source: str) -> Corpus:
    """Group `bible -f` lines ("Ge1:1 In the beginning ...") into chapters of verse texts."""
    chapters: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = VERSE_LINE.match(line.strip())
        if match:
            chapters.setdefault(match.group(1), []).append(match.group(2).strip())
    n_verses = sum(map(len, chapters.values()))
    if n_verses < KJV_VERSES // 2:
        raise UserError(f"{source} holds {n_verses} verses, not the {KJV_VERSES} of the "
                        f"KJV; extract it with `bible -f {BIBLE_RANGE} </dev/null`.")
    return Corpus(list(chapters.values()), source)


def train_tokenizer(verses: list[str], vocab_size: int, seed: int) -> bytes:
    """Train a Llama-style SentencePiece BPE model (byte fallback, unk=0, bos=1, eos=2).

    One thread and no input shuffling make the model the same bytes on every run.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(verses), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, input_sentence_size=10_000_000,
        shuffle_input_sentence=False, minloglevel=2,
    )
    return model.getvalue()


def load_tokenizer(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def encode_chapters(sp, chapters: list[list[str]]) -> np.ndarray:
    """One token stream: each chapter is BOS followed by its verses joined by spaces."""
    ids: list[int] = []
    for chapter in chapters:
        ids.append(sp.bos_id())
        ids.extend(sp.EncodeAsIds(" ".join(chapter)))
    return np.asarray(ids, dtype=np.int64)


def split_chapters(chapters: list[list[str]], seed: int, every: int = 50):
    """Hold out every `every`-th chapter (in a seeded order) for validation."""
    order = np.random.default_rng(seed).permutation(len(chapters))
    held = set(order[::every].tolist())
    train = [c for i, c in enumerate(chapters) if i not in held]
    return train, [c for i, c in enumerate(chapters) if i in held]


def build_config(args: argparse.Namespace, vocab_size: int) -> Config:
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads  # 0 is refused
    return Config(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                  n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  max_seq_len=args.seq_len, dtype="float32")


def init_weights(model: Transformer, n_layers: int) -> None:
    """GPT-2 style init: N(0, 0.02), residual output projections scaled by depth."""
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        std = 0.02
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            std /= math.sqrt(2 * n_layers)
        torch.nn.init.normal_(param, mean=0.0, std=std)


def make_optimizer(model: Transformer, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = args.device == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def get_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Random windows: inputs and next-token targets, each (batch, seq), on data's device."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    index = starts[:, None] + torch.arange(seq + 1)  # (batch, seq + 1)
    window = data[index.to(data.device)]
    return window[:, :-1], window[:, 1:]


def autocast(device: str):
    """bf16 autocast on CUDA; plain float32 on CPU."""
    if device == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_on(model, x: torch.Tensor, y: torch.Tensor, device: str) -> torch.Tensor:
    with autocast(device):
        logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean loss over a fixed set of validation windows."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = [loss_on(model, *get_batch(data, args.batch_size, args.seq_len, gen),
                      args.device).item() for _ in range(args.eval_batches)]
    model.train()
    return float(np.mean(losses))


class BestWeights:
    """The weights with the lowest validation loss so far: a small corpus is soon memorised."""

    def __init__(self) -> None:
        self.loss, self.step, self.state = math.inf, -1, None

    def offer(self, model: Transformer, loss: float, step: int) -> None:
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: Transformer) -> None:
        model.load_state_dict(self.state)


def train_step(step_fn, model: Transformer, optimizer, batch, step: int,
               args: argparse.Namespace) -> torch.Tensor:
    """One AdamW update on one batch; returns the (un-synchronised) loss."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args)
    loss = loss_on(step_fn, *batch, args.device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def validate(model: Transformer, data: torch.Tensor, args: argparse.Namespace,
             best: BestWeights, step: int) -> float:
    """Print the validation loss, remember the best weights; returns the seconds it took."""
    start = time.perf_counter()
    loss = evaluate(model, data, args)
    print(f"step {step:6d}  val loss {loss:.4f}", flush=True)
    best.offer(model, loss, step)
    return time.perf_counter() - start


def train(model: Transformer, train_data: torch.Tensor, val_data: torch.Tensor,
          args: argparse.Namespace) -> dict[str, float]:
    """Optimise, printing progress; leaves the best-validation weights in `model`.

    Returns:
        Last training loss, best validation loss and its step, training steps/s and seconds
        (validation time excluded).
    """
    optimizer = make_optimizer(model, args)
    step_fn = torch.compile(model) if args.compile else model
    gen, best, eval_seconds = torch.Generator().manual_seed(args.seed), BestWeights(), 0.0
    start = time.perf_counter()
    for step in range(args.steps):
        batch = get_batch(train_data, args.batch_size, args.seq_len, gen)
        loss = train_step(step_fn, model, optimizer, batch, step, args)
        if step % args.log_every == 0 or step == args.steps - 1:
            report_progress(step, loss.item(), args, time.perf_counter() - start - eval_seconds)
        if (args.eval_every and step and step % args.eval_every == 0) or step == args.steps - 1:
            eval_seconds += validate(model, val_data, args, best, step)
    seconds = time.perf_counter() - start - eval_seconds
    best.restore(model)
    return {"train_loss": loss.item(), "val_loss": best.loss, "best_step": best.step,
            "steps_per_s": args.steps / seconds, "seconds": seconds}


def report_progress(step: int, loss: float, args: argparse.Namespace, elapsed: float) -> None:
    rate = (step + 1) / elapsed
    print(f"step {step:6d}  loss {loss:.4f}  lr {learning_rate(step, args):.2e}  "
          f"{rate:.2f} steps/s  {rate * args.batch_size * args.seq_len:,.0f} tok/s  "
          f"{elapsed:,.0f}s", flush=True)


def samples(model: Transformer, sp, seed: int, n_tokens: int = 60) -> list[str]:
    """Greedy and sampled continuations of a few prompts (model on CPU, float32)."""
    lines = []
    for prompt in PROMPTS:
        ids = [sp.bos_id()] + sp.EncodeAsIds(prompt)
        greedy = greedy_tokens(model, ids, n_tokens)
        sampled = sample_tokens(model, ids, n_tokens, seed)
        lines.append(f"[greedy]  {sp.DecodeIds(ids[1:] + greedy)}")
        lines.append(f"[sampled] {sp.DecodeIds(ids[1:] + sampled)}")
    return lines


@torch.no_grad()
def sample_tokens(model: Transformer, prompt: list[int], steps: int, seed: int) -> list[int]:
    """Temperature 0.8, top-p 0.9 continuation, re-running the whole sequence each step."""
    settings, rng = SamplingSettings(temperature=0.8, top_p=0.9), make_rng(seed)
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens[-model.config.max_seq_len:]]))[0, -1]
        tokens.append(sample_token(logits.numpy(), settings, rng))
    return tokens[len(prompt):]


def save_checkpoint(out: Path, model: Transformer, tokenizer: bytes, info: dict) -> None:
    """Write config.json, model.safetensors (HF names, float32), tokenizer.model, training.json.

    Each file is written under a temporary name and renamed, so none is ever half-written.
    """
    claim_tool_out(out, OUT_FILES, "tools/train_demo.py")
    config = model.config
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    shapes = canonical_shapes(config)
    assert set(state) == set(shapes), sorted(set(state) ^ set(shapes))
    names = {hf_name(k): k for k in state}
    assert len(names) == len(state), "two tensors map to one Hugging Face name"
    specs = [(hf, np.float32, shapes[k]) for hf, k in names.items()]
    tmp = out / "model.safetensors.tmp"
    safetensors_io.write_streaming(tmp, specs, lambda hf: state[names[hf]], {"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / "tokenizer.model.tmp").write_bytes(tokenizer)
    os.replace(out / "tokenizer.model.tmp", out / "tokenizer.model")
    write_text_atomic(out / "training.json", json.dumps(info, indent=2) + "\n")
    hf_config = json.dumps(hf_config_dict(config, "float32"), indent=2)
    write_text_atomic(out / "config.json", hf_config + "\n")


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; "
                        "install a CUDA build of torch or use --device cpu.")
    return requested


def prepare_data(args: argparse.Namespace):
    """Corpus, tokenizer bytes and the train/validation token streams on the device."""
    corpus = read_corpus(args.corpus)
    check_vocab_size(args.vocab_size, corpus)
    tokenizer = train_tokenizer(corpus.verses, args.vocab_size, args.seed)
    sp = load_tokenizer(tokenizer)
    train_chapters, val_chapters = split_chapters(corpus.chapters, args.seed)
    train_ids = encode_chapters(sp, train_chapters)
    val_ids = encode_chapters(sp, val_chapters)
    print(f"corpus: {corpus.source}: {len(corpus.chapters)} chapters, "
          f"{len(corpus.verses)} verses; tokens: {len(train_ids):,} train, "
          f"{len(val_ids):,} validation (vocab {sp.vocab_size()})", flush=True)
    if len(val_ids) <= args.seq_len + 1:
        raise UserError(f"--seq-len {args.seq_len} is longer than the validation text "
                        f"({len(val_ids)} tokens); use a shorter window.")
    to_device = lambda ids: torch.from_numpy(ids).to(args.device)  # noqa: E731
    return corpus, tokenizer, sp, to_device(train_ids), to_device(val_ids)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work (reading the corpus, training): one sentence each.

    Raises:
        UserError naming the flag and the fix.
    """
    for name in ("steps", "batch_size", "seq_len", "vocab_size", "log_every", "eval_batches",
                 "dim", "n_layers", "n_heads"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a "
                            "positive number.")
    for name in ("warmup", "eval_every", "weight_decay"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be 0 or "
                            "more.")
    if not 0 < args.lr < math.inf:
        raise UserError(f"--lr {args.lr} must be a positive number.")
    if args.n_kv_heads is not None and not 0 < args.n_kv_heads <= args.n_heads:
        raise UserError(f"--n-kv-heads {args.n_kv_heads} must be between 1 and --n-heads "
                        f"{args.n_heads} (leave it out for {args.n_heads}).")
    head_dim = args.dim // args.n_heads
    if args.dim % args.n_heads or head_dim % 16:
        raise UserError(f"--dim {args.dim} with --n-heads {args.n_heads} does not give heads "
                        "of a multiple of 16 values, which ONNX Runtime's attention needs; use "
                        f"a --dim that is a multiple of {16 * args.n_heads}.")
    build_config(args, vocab_size=args.vocab_size)  # anything else Config refuses
    if args.corpus is not None:
        check_corpus_path(args.corpus)
    check_tool_out(args.out)


def check_corpus_path(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"--corpus {path} is not a file; {CORPUS_FIX.format(path=path)}.")


def check_vocab_size(vocab_size: int, corpus: Corpus) -> None:
    """SentencePiece needs a piece for every character of the corpus besides the special ones."""
    need = SPECIAL_PIECES + len(set("".join(corpus.verses)) | {" "})
    if vocab_size < need:
        raise UserError(f"--vocab-size {vocab_size} is too small for {corpus.source}: its "
                        f"characters and the {SPECIAL_PIECES} special and byte pieces need at "
                        f"least {need}; pass --vocab-size {need} or more.")


def run_training(args: argparse.Namespace) -> Path:
    """Tokenizer, model, training, samples and the checkpoint folder; returns the folder."""
    check_args(args)
    args.device = pick_device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    corpus, tokenizer, sp, train_data, val_data = prepare_data(args)
    config = build_config(args, sp.vocab_size())
    model = Transformer(config)
    init_weights(model, config.n_layers)
    model.to(args.device)
    print(f"model: {config.n_params():,} parameters ({config.n_params() * 4 / 1e6:.1f} MB "
          f"float32), device {args.device}", flush=True)
    stats = train(model, train_data, val_data, args)
    print(f"done: last train loss {stats['train_loss']:.4f}; keeping step {stats['best_step']} "
          f"(val loss {stats['val_loss']:.4f}); {stats['steps_per_s']:.2f} steps/s, "
          f"{stats['seconds']:,.0f}s training", flush=True)
    model.float().cpu().eval()
    text = samples(model, sp, args.seed)
    print("\n".join(text), flush=True)
    info = {"corpus": corpus.source, "license": "public domain (King James Version, 1611)",
            "train_tokens": len(train_data), "val_tokens": len(val_data),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **stats, "samples": text}
    save_checkpoint(args.out, model, tokenizer, info)
    print(f"wrote {args.out}", flush=True)
    return args.out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write: new, "
                   "empty, or one a tool of this project wrote")
    p.add_argument("--corpus", type=Path, help="text from `bible -f` (default: run `bible`)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256, help="window; also max_seq_len")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=None, help="default: --n-heads")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337,
                   help="seeds the data split, initialisation and batches (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250, help="0: only at the end")
    p.add_argument("--eval-batches", type=int, default=8)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    def train() -> None:  # mistakes: one `error:` line and exit code 2 (cli.run_main)
        run_training(args)

    run_main(train)


if __name__ == "__main__":
    main()
