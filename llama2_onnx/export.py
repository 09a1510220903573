"""Export a Llama 2 checkpoint to a verified variant folder, streaming one tensor at a time."""

from __future__ import annotations

import datetime
import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import __version__, safetensors_io
from .checkpoints import HF_CONFIG, META_PARAMS, Source, open_source
from .config import NP_DTYPES, Config
from .errors import CheckpointError, UserError, VerificationError
from .files import check_not_lfs_pointer
from .graph import (
    ExternalDataWriter,
    build_model,
    largest_storable,
    n_graph_tensors,
    quantized,
)
from .placement import kv_cache_bytes
from .resources import GiB, free_host_memory, require
from .staging import (
    begin_staging,
    check_replaceable,
    move_into_place,
    remove_stale_leftovers,
    signals_as_interrupts,
    staging_path,
)
from .tokenizer import open_tokenizer
from .variant_card import gitattributes, variant_readme
from .variant_folder import (
    CACHE_DIR,
    CONFIG,
    EMBEDDINGS,
    GITATTRIBUTES,
    GITIGNORE,
    GRAPH_DIR,
    HF_TOKENIZER,
    README,
    TOKENIZER,
    TOKENIZER_CONFIG,
    data_path,
    graph_name,
    tokenizer_files,
    tokenizer_near,
    write_manifest,
)
from .variants import REPO_ROOT, check_variant_name

VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
VERIFY_STEPS = 20
DEFAULT_BLOCK_SIZE = 32
INT4_OUTPUTS = ("int4", "float16")  # what --int4-output takes


@dataclass
class ExportRequest:
    """Everything `export_variant` needs; mirrors the CLI's flags."""

    variant: str
    precision: str
    block_size: int | None = None  # int4 only; default DEFAULT_BLOCK_SIZE
    int4_output: str | None = None  # int4 only: "int4" or "float16" output projection
    hf: Path | None = None
    meta: Path | None = None
    gguf: Path | None = None  # a GGUF file (gguf_source.py); its tokenizer comes from it
    tokenizer: Path | None = None
    out: Path = Path(".")
    max_seq_len: int | None = None
    chat: bool = False
    force: bool = False
    skip_verify: bool = False
    progress: bool = True
    lfs: bool = True  # False: no .gitattributes (a variant committed to a plain repo: the demo)
    on_verified: Callable[[VerifyReport], None] | None = None  # gets the verification report


def export_variant(req: ExportRequest) -> Path:
    """Write `<out>/<variant>/`, verify it, and move it into place only when complete.

    Returns:
        The finished variant folder.
    Raises:
        UserError (or a subclass) for bad input; VerificationError when the graph disagrees
        with the reference, in which case nothing is left behind.
    """
    final = _output_folder(req)
    if req.precision not in NP_DTYPES:
        raise UserError(f"--precision {req.precision!r} is not one of float32, float16, int4.")
    if req.block_size is not None and req.precision != "int4":
        raise UserError("--block-size only applies to --precision int4.")
    if req.int4_output is not None and req.precision != "int4":
        raise UserError("--int4-output only applies to --precision int4.")
    if req.int4_output not in (None, *INT4_OUTPUTS):
        raise UserError(f"--int4-output {req.int4_output!r} is not one of "
                        f"{', '.join(INT4_OUTPUTS)}.")
    protected = [REPO_ROOT, *(p for p in (req.hf, req.meta, req.gguf, req.tokenizer)
                              if p is not None)]
    remove_stale_leftovers(final.parent)  # first: a variant hidden by a killed export returns
    check_replaceable(final, req.force, protected)
    source, tokenizer_path, config = _open_inputs(req)
    _check_disk(final.parent, config)
    staging = staging_path(final)
    if not req.skip_verify:
        # PyTorch (the verification's reference) is imported before signals become interrupts:
        # an interrupt raised while its native code runs Python aborts the process (pybind11
        # cannot pass the exception through) instead of cleaning up.
        import torch  # noqa: F401
    with signals_as_interrupts():
        begin_staging(staging)  # outside the try: a folder it refuses is not ours to remove
        try:
            codes_kept = _write_variant(staging, source, tokenizer_path, config, req)
            if not req.skip_verify:
                # int4 that kept every code of a 4-bit source differs from the de-quantized
                # reference by float16 rounding alone, so it is held to float16's bounds.
                bounds = BOUNDS["float16"] if codes_kept else None
                report = verify_variant_against(staging, source, bounds)
                if req.on_verified is not None:
                    req.on_verified(report)
            move_into_place(staging, final)
        except OSError as exc:
            raise _os_error(exc, final.parent) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _output_folder(req: ExportRequest) -> Path:
    check_variant_name(req.variant)
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass the folder that should hold the variant.")
    return out / req.variant


def _os_error(exc: OSError, out: Path) -> UserError:
    """A failed write (full disk, no permission...) as one sentence; nothing was kept."""
    where = exc.filename or out
    if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return UserError(f"the disk filled up while writing {where} ({exc.strerror}); nothing "
                         "was written: free some space or pass another --out.")
    return UserError(f"cannot write {where} ({exc.strerror}); nothing was written: check the "
                     "folder's permissions or pass another --out.")


def _open_inputs(req: ExportRequest) -> tuple[Source, Path | dict[str, str], Config]:
    """The source, its tokenizer (a file to copy, or a GGUF file's files to write: name ->
    text) and the variant's config."""
    for flag, folder in (("--hf", req.hf), ("--meta", req.meta)):
        if folder is not None and not Path(folder).is_dir():
            raise CheckpointError(f"{flag} {folder} does not exist or is not a folder; pass the "
                                  f"checkpoint folder (it holds {HF_CONFIG} or {META_PARAMS}).")
    if req.gguf is not None:
        source, tokenizer_path = _open_gguf(req)
        template = json.loads(tokenizer_path[TOKENIZER_CONFIG]).get("chat_template")
    else:
        tokenizer_path = _find_tokenizer(req)
        tokenizer = open_tokenizer(tokenizer_path)
        source = open_source(hf=req.hf, meta=req.meta, vocab_size=tokenizer.n_words,
                             max_seq_len=req.max_seq_len)
        _check_tokenizer_size(tokenizer.n_words, tokenizer_path, source.config)
        template = tokenizer.chat_template
    return source, tokenizer_path, _variant_config(source, req, chat=req.chat or bool(template))


def _open_gguf(req: ExportRequest) -> tuple[Source, dict[str, str]]:
    from tokenizers import Tokenizer as Backend

    from .gguf_source import GGUFSource

    if req.hf is not None or req.meta is not None:
        raise CheckpointError("pass exactly one of --hf DIR, --meta DIR or --gguf FILE.")
    if req.tokenizer is not None:
        raise UserError("--tokenizer does not apply to --gguf: the file's own tokenizer is "
                        "used; drop --tokenizer.")
    source = GGUFSource(req.gguf)
    files = source.tokenizer_files()
    words = Backend.from_str(files[HF_TOKENIZER]).get_vocab_size(with_added_tokens=True)
    _check_tokenizer_size(words, Path(req.gguf), source.config)
    return source, files


def _check_tokenizer_size(words: int, tokenizer_path: Path, config: Config) -> None:
    """Fewer ids than the model's rows is allowed (vocabularies padded to a round size)."""
    if words > config.vocab_size:
        raise UserError(
            f"the tokenizer {tokenizer_path} has {words} tokens but the model has "
            f"only vocab_size={config.vocab_size}; pass the tokenizer that came with these "
            "weights (--tokenizer)."
        )


def _variant_config(source: Source, req: ExportRequest, chat: bool) -> Config:
    # An explicit value is used or refused, never replaced (0 is not "not given").
    max_len = source.config.max_seq_len if req.max_seq_len is None else req.max_seq_len
    if max_len < 2:
        raise UserError(f"--max-seq-len {max_len} is too short; a variant needs a context of at "
                        "least 2 tokens (Llama 2's is 4096).")
    _check_export_memory(source.config, max_len, req.skip_verify)
    provenance = {**source.describe(), "exporter": f"llama2_onnx {__version__}",
                  "onnx_opset": "17 + com.microsoft 1",
                  "exported": datetime.date.today().isoformat()}
    block = None if req.precision != "int4" else (
        DEFAULT_BLOCK_SIZE if req.block_size is None else req.block_size)
    output_int4 = None
    if req.int4_output is not None:  # asked: 4-bit codes (re-rounded if need be) or float16
        output_int4 = req.int4_output == "int4"
    elif block is not None and source.prequantized:
        # llama.cpp keeps the output projection above 4 bits (SmolLM2's tied table: Q8_0);
        # rounding it to int4 again cost most of int4's error there (docs/export.md), so it
        # stays float16 unless the file's own 4-bit codes can be kept.
        blocks = source.int4_blocks("output.weight")
        output_int4 = blocks is not None and blocks.block == block
    return source.config.replace(dtype=req.precision, block_size=block, chat=chat,
                                 max_seq_len=max_len, provenance=provenance,
                                 output_int4=output_int4)


def _check_export_memory(config: Config, max_len: int, skip_verify: bool) -> None:
    """Refuse a context whose rotary tables (computed in float64) or verification KV cache
    cannot fit in host memory, before anything is allocated."""
    tables = 3 * max_len * (config.head_dim // 2) * 8
    kv = 0 if skip_verify else kv_cache_bytes(config, max_len, "float32")
    require(f"--max-seq-len {max_len} (rotary tables {tables / GiB:.1f} GiB, verification KV "
            f"cache {kv / GiB:.1f} GiB)", tables + kv, free_host_memory(), "host memory",
            "pass a smaller --max-seq-len (Llama 2 was trained with 4096)")


def _find_tokenizer(req: ExportRequest) -> Path:
    """--tokenizer, else the checkpoint's tokenizer.model (in its folder or one up: Llama 2),
    else its tokenizer.json (Llama 3, SmolLM2, ...)."""
    folder = Path(req.hf or req.meta or ".")
    path = Path(req.tokenizer or tokenizer_near(folder))
    if req.tokenizer is None and not path.is_file() and (folder / HF_TOKENIZER).is_file():
        path = folder / HF_TOKENIZER
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist; pass --tokenizer PATH to the "
                        f"{TOKENIZER} or {HF_TOKENIZER} that came with the weights.")
    check_not_lfs_pointer(path)
    return path


def _check_disk(folder: Path, config: Config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    need, free = int(config.weight_bytes() * 1.05), shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"the export needs about {need / 2**30:.1f} GiB in {folder} but only "
                        f"{free / 2**30:.1f} GiB is free; free some space or pass another --out.")


def _write_variant(folder: Path, source: Source, tokenizer: Path | dict[str, str],
                   config: Config, req: ExportRequest) -> bool:
    """Write the variant's files into `folder`.

    Returns:
        Whether every 4-bit matrix kept the source's own codes (int4 from a Q4_0/Q4_1 GGUF).
    """
    source = _StorableSource(source, config)
    (folder / GRAPH_DIR).mkdir(parents=True)
    graph_path = folder / GRAPH_DIR / graph_name(req.variant)
    kept = _KeptBlocks(source)
    with _Progress(config, enabled=req.progress) as progress:
        writer = ExternalDataWriter(data_path(graph_path),
                                    on_write=progress.update)
        try:
            model = build_model(config, source.read, writer, blocks=kept)
        finally:
            writer.close()
        known = {data_path(graph_path).relative_to(folder).as_posix(): writer.sha256()}
        onnx.save_model(model, str(graph_path))
        _write_embeddings(folder / EMBEDDINGS, source, config)
        itemsize = np.dtype(NP_DTYPES[config.dtype]).itemsize
        progress.update("tok_embeddings.weight", config.vocab_size * config.dim * itemsize)
    if isinstance(tokenizer, dict):  # a GGUF file's: written from its metadata
        for name, text in tokenizer.items():
            (folder / name).write_text(text, encoding="utf-8")
        names = tuple(tokenizer)
    else:
        names = ()
        for path, name in tokenizer_files(tokenizer):
            shutil.copyfile(path, folder / name)
            names += (name,)
    if kept.kept:
        config = config.replace(provenance={
            **config.provenance, "int4_codes_kept": f"{len(kept.kept)} of {kept.asked} "
            "matrices keep the source's 4-bit codes"})
    config.save(folder / CONFIG)
    card = variant_readme(req.variant, config, names)
    (folder / README).write_text(card, encoding="utf-8")
    if req.lfs:
        (folder / GITATTRIBUTES).write_text(gitattributes(), encoding="utf-8")
    (folder / GITIGNORE).write_text(f"{GRAPH_DIR}/{CACHE_DIR}/\n", encoding="utf-8")
    write_manifest(folder, req.variant, known)
    return bool(kept.kept) and len(kept.kept) == kept.asked


class _KeptBlocks:
    """The source's int4_blocks, noting which matrices kept their codes (for the variant's
    provenance and its verification)."""

    def __init__(self, source: Source) -> None:
        self.source, self.asked, self.kept = source, 0, []

    def __call__(self, name: str):
        self.asked += 1
        blocks = self.source.int4_blocks(name)
        if blocks is not None:
            self.kept.append(name)
        return blocks


def _write_embeddings(path: Path, source: Source, config: Config) -> None:
    dtype = NP_DTYPES[config.dtype]
    spec = [("weight", np.dtype(dtype), (config.vocab_size, config.dim))]
    safetensors_io.write_streaming(path, spec, lambda _: source.read("tok_embeddings.weight"))


class _StorableSource:
    """The source with every tensor checked as it streams into the variant: finite, and no
    larger than the variant's type stores (graph.largest_storable), so none becomes inf."""

    def __init__(self, source: Source, variant: Config) -> None:
        self.source, self.variant, self.config = source, variant, source.config

    def read(self, name: str) -> np.ndarray:
        array = self.source.read(name)
        check_storable(name, array, self.variant, self.source.where(name))
        return array

    def where(self, name: str) -> str:
        return self.source.where(name)

    def describe(self) -> dict[str, str]:
        return self.source.describe()

    def int4_blocks(self, name: str):
        return self.source.int4_blocks(name)

    @property
    def prequantized(self) -> bool:
        return self.source.prequantized


def check_storable(name: str, array: np.ndarray, variant: Config, where: str) -> None:
    """Refuse a tensor with NaN or inf, or one the variant's type cannot hold.

    Args:
        name: the canonical tensor name; where: its own name and file (Source.where).
    Raises:
        CheckpointError naming the tensor, its file, the value and where it is.
    """
    if not array.size:
        return
    high, low = float(array.max()), float(array.min())  # NaN propagates; no temporaries
    limit = largest_storable(variant, name)
    if not np.isfinite([high, low]).all():
        kind = "NaN" if np.isnan([high, low]).any() else "an infinite value"
        at = _index_of(~np.isfinite(array))
        raise CheckpointError(f"tensor {name} ({where}) holds {kind} at {at}; the checkpoint "
                              "is damaged: download it again (nothing was written).")
    if max(high, -low) > limit:
        value = high if high >= -low else low
        stored = np.dtype(NP_DTYPES[variant.dtype]).name
        what = (f"int4's {stored} block scales allow ({limit:g}, 8 x the largest {stored})"
                if quantized(variant, name) else f"{stored} holds ({limit:g})")
        raise CheckpointError(
            f"tensor {name} ({where}) holds {value:g} at {_index_of(np.abs(array) > limit)}, "
            f"more than {what}, so the variant would store inf there; export with --precision "
            "float32, or repair that tensor (nothing was written).")


def _index_of(mask: np.ndarray) -> list[int]:
    """The index of the first true element of `mask`, as a list (e.g. [3, 17])."""
    return [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)]


class _Progress:
    """A tqdm bar counting the tensors written, with the bytes written so far beside it; or
    nothing when disabled. Its total is exact but for int4 kept from Q4_1 blocks, whose
    matrices each add an offset tensor: the total grows by those as they come."""

    def __init__(self, config: Config, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None
        self.total = n_graph_tensors(config) + 1  # the graph's tensors and the embedding table
        self.bytes = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit=" tensors", desc="export")
        return self

    def update(self, name: str, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.bytes / 1e9:.2f} GB", refresh=False)
            if self.bar.n >= self.bar.total:  # an offset tensor beside kept Q4_1 codes
                self.bar.total = self.bar.n + 1
            self.bar.update(1)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Bounds:
    """What a verified export may differ from the float32 reference by, at every step."""

    rel_rms: float  # RMS of the logit difference over the std of the reference's logits
    kl: float  # KL divergence (nats) of the variant's next-token distribution from the reference's
    top1: float  # least fraction of steps whose most likely token agrees


# Worst step of 20 measured (README "Verification"): the trained demo model, 8 seeded tiny
# random ones (2 layers, MHA and GQA, HF and Meta) and a random 110M one (12 layers), against
# deliberately broken exports (one layer's w2 negated, wv zeroed or wo's rows reversed).
#                  healthy rel_rms / KL / top-1         broken rel_rms / KL (least of the 3)
#   float32        1.5e-6 / 1.1e-12 / 100 %            0.31 / 0.08
#   float16        1.1e-3 / 2.2e-6 / 100 %             0.31 / 0.08
#   int4 b32-128   0.32 / 0.092 / 45 % (random 110M)   0.29 with KL 1.1, or 0.49 with KL 0.10
# float32 and float16 bounds leave 20-100x room for deeper models. int4's own error is the size
# of a subtle fault (scaling one matrix by 1.3 gives 0.15-0.31 / 0.03-0.34), so its bounds
# catch broken exports and tools/evaluate.py's perplexity judges its quality; top-1 agreement
# is loose for int4 because random and tiny models have many near-ties.
BOUNDS = {"float32": Bounds(rel_rms=1e-3, kl=1e-5, top1=0.95),
          "float16": Bounds(rel_rms=0.02, kl=1e-3, top1=0.9),
          "int4": Bounds(rel_rms=0.45, kl=0.25, top1=0.3)}


@dataclass
class VerifyReport:
    """Worst step of a teacher-forced comparison with the PyTorch reference."""

    precision: str
    max_abs_diff: float
    rel_rms: float
    kl: float
    top1: float
    bounds: Bounds
    steps: int

    @property
    def tokens_agree(self) -> bool:
        return self.top1 == 1.0

    @property
    def ok(self) -> bool:
        b = self.bounds
        return self.rel_rms <= b.rel_rms and self.kl <= b.kl and self.top1 >= b.top1

    def summary(self) -> str:
        b = self.bounds
        return (f"verify {'OK' if self.ok else 'FAILED'} ({self.precision}, {self.steps} steps): "
                f"logit error {self.rel_rms:.2g} of their spread (bound {b.rel_rms:g}), "
                f"KL {self.kl:.2g} nats (bound {b.kl:g}), top-1 agreement {self.top1:.0%} "
                f"(at least {b.top1:.0%}); max |logit diff| {self.max_abs_diff:.3g}")


def step_errors(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float, bool]:
    """Relative RMS error, KL(reference || ours) in nats and top-1 agreement of one step."""
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    rel_rms = float(np.sqrt(np.mean((ours - reference) ** 2)) / max(reference.std(), 1e-12))
    log_p, log_q = _log_softmax(reference), _log_softmax(ours)
    kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    return rel_rms, max(kl, 0.0), int(ours.argmax()) == int(reference.argmax())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def verify_variant_against(folder: Path, source: Source,
                           bounds: Bounds | None = None) -> VerifyReport:
    """Run the variant on ONNX Runtime CPU and compare with the PyTorch reference.

    Args:
        bounds: what the variant may differ by (default: its precision's BOUNDS).
    Raises:
        VerificationError when a step's error exceeds the bounds.
    """
    try:
        report = compare_with_reference(folder, source, bounds=bounds)
    except VerificationError as exc:  # non-finite logits: one sentence, its fix last
        raise VerificationError(f"{str(exc).rstrip('.')} (the variant was not written).") \
            from None
    if not report.ok:
        raise VerificationError(report.summary() + "; the variant was not written. Re-run with "
                                "--precision float32 to check the source, or report a bug.")
    return report


def compare_with_reference(folder: Path, source: Source, steps: int = VERIFY_STEPS,
                           provider: str = "cpu", bounds: Bounds | None = None) -> VerifyReport:
    """Teacher-forced comparison: at each step both models see the reference's greedy tokens.

    Raises:
        VerificationError when either model's logits hold inf or NaN (no error measures that).
    """
    import torch

    from .generation import Engine
    from .reference import Transformer

    engine = Engine.from_variant(folder, provider=provider, check_files=False)
    reference = load_reference(source, Transformer)
    steps = min(steps, engine.context_len // 2)  # short contexts: fewer steps, shorter prompt
    prompt = engine.tokenizer.encode(VERIFY_PROMPT)[:engine.context_len - steps]
    with torch.no_grad():
        ref_logits = reference(torch.tensor([prompt]))[0]
    tokens = list(prompt)
    ort_logits = engine.prefill(prompt)
    worst_abs, errors, dtype = 0.0, [], engine.config.dtype
    for step in range(steps):
        ref_last = ref_logits[-1].numpy()
        _require_finite(ort_logits, ref_last, dtype, f"step {step + 1} of {steps}")
        worst_abs = max(worst_abs, float(np.abs(ort_logits - ref_last).max()))
        errors.append(step_errors(ort_logits, ref_last))
        tokens.append(int(ref_last.argmax()))
        if step + 1 < steps:
            with torch.no_grad():
                ref_logits = reference(torch.tensor([tokens]))[0]
            ort_logits = engine.decode_step(tokens[-1])
    rel_rms, kl, top1 = np.asarray(errors, np.float64).T  # (3, steps)
    return VerifyReport(dtype, worst_abs, float(rel_rms.max()), float(kl.max()),
                        float(top1.mean()), bounds or BOUNDS[dtype], steps)


def _require_finite(ours: np.ndarray, reference: np.ndarray, precision: str, when: str) -> None:
    if not np.isfinite(reference).all():
        raise VerificationError(f"verify FAILED: the float32 PyTorch reference computed inf or "
                                f"NaN logits at {when}, so the checkpoint's weights overflow "
                                "even float32; check the checkpoint or download it again.")
    if not np.isfinite(ours).all():
        fix = "report a bug" if precision == "float32" else "export with --precision float32"
        activations = np.dtype(NP_DTYPES[precision]).name
        raise VerificationError(f"verify FAILED ({precision}): the variant computed inf or NaN "
                                f"logits at {when} where the float32 reference's are finite, so "
                                f"its {activations} activations overflow; {fix}.")


def load_reference(source: Source, transformer_cls):
    """Build the float32 PyTorch reference from the source's canonical tensors."""
    import torch

    model = transformer_cls(source.config)
    state = {name: torch.from_numpy(np.asarray(source.read(name), dtype=np.float32))
             for name in model.state_dict()}
    model.load_state_dict(state)
    return model.eval()

