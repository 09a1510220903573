"""Where and how a variant runs: one value decided once from its config, the user's options
and what is installed, and read by everything below (DESIGN.md, "Placement and runtime").

    RunOptions (what the user asked; the CLI, chat app, server and tools hold it whole)
        + Config (the variant) + the installed providers
        --place()--> Placement: provider, device, graph form, activation type, cache length,
                     graph capture, prefill chunk, continued prefill, binding by address,
                     slots (sequences decoded together)
        --> session options, the runtime's buffers, the memory check, the graph check

This is the only module that compares provider names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort

from . import graph_forms, webgpu
from .config import NP_DTYPES, Config
from .errors import UserError, is_whole_number
from .resources import free_cuda_memory
from .variant_folder import ORIGINAL, OURS

PROVIDERS = {"dml": "DmlExecutionProvider", "cuda": "CUDAExecutionProvider",
             "webgpu": webgpu.EP_NAME, "cpu": "CPUExecutionProvider"}
PACKAGES = {"dml": "onnxruntime-directml (Windows only)",
            "cuda": "onnxruntime-gpu (uninstall the plain onnxruntime package first)",
            "webgpu": "onnxruntime-ep-webgpu", "cpu": "onnxruntime"}
# `auto` takes the first installed: a vendor's own provider where one is installed (DirectML
# on Windows, CUDA with onnxruntime-gpu), else WebGPU where its plugin finds a GPU adapter
# (any vendor; the only GPU path on a Mac), else the CPU.
AUTO_ORDER = ("dml", "cuda", "webgpu", "cpu")
PROVIDER_CHOICES = ("auto", *AUTO_ORDER)
# Graph contracts a placement is made for are the variant formats (variant_folder.OURS: ours,
# graph.py; ORIGINAL: the original Llama-2-Onnx release).
# Longest prefill chunk per provider (see session.Runtime.run): on CUDA every new input length
# costs a lot the first time ONNX Runtime sees it, so prompts run in power-of-two chunks that
# are all seen once at load. DirectML cannot continue a prefill (one token at a time after the
# first run) and the CPU has no such first-time cost: both run the whole prompt at once.
PREFILL_CHUNK = {"cuda": 1024}


@dataclass(frozen=True)
class RunOptions:
    """How the user asked a variant to run; checked here, decided by place().

    provider: auto|dml|cuda|webgpu|cpu. max_seq_len: tokens of KV cache (None: the model's context).
    graph_capture: replay decode steps as a captured GPU graph; "auto": where it is shown
    token-identical and faster (CUDA, WebGPU). prefill_chunk: longest prefill run (a power of
    two); None: whole prompts at once; "auto": the provider's default. check_files / verify:
    check the manifest's sizes / also its sha256 before loading. profile: a file prefix for
    ONNX Runtime's profiler.
    parallel: sequences held in the KV cache and decoded together (slots; 1: one at a time;
    "auto": the provider's default for a server, auto_slots, which tools/serve.py uses).
    """

    provider: str = "auto"
    max_seq_len: int | None = None
    graph_capture: bool | str = "auto"
    prefill_chunk: int | str | None = "auto"
    check_files: bool = True
    verify: bool = False
    profile: str | None = None
    parallel: int | str = 1

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_CHOICES:
            raise UserError(f"--provider {self.provider!r} is not one of "
                            f"{', '.join(PROVIDER_CHOICES)}.")
        if self.max_seq_len is not None and not is_whole_number(self.max_seq_len, 2):
            raise UserError(f"--max_seq_len {self.max_seq_len!r} is too short; use at least 2 "
                            "(or leave it out for the model's context).")
        if self.graph_capture not in (True, False, "auto"):
            raise UserError(f"graph capture {self.graph_capture!r} must be on, off or auto.")
        if self.prefill_chunk not in ("auto", None) and not is_whole_number(self.prefill_chunk):
            raise UserError(f"prefill chunk {self.prefill_chunk!r} must be a whole number of "
                            "at least 1, or None for whole prompts.")
        if self.parallel != "auto" and not is_whole_number(self.parallel):
            raise UserError(f"--parallel {self.parallel!r} is invalid; use a whole number of "
                            "at least 1 (the requests decoded together).")


@dataclass(frozen=True)
class Placement:
    """Where and how one variant runs (see the module docstring); made by place()."""

    provider: str  # the installed provider's short name (PROVIDERS)
    device: str  # where OrtValues live: "cuda", "dml", "webgpu" or "cpu"
    form: str  # the graph form the session opens (graph_forms)
    activation: str  # the session's activation type, "float16" or "float32"
    cache_len: int  # KV cache positions
    graph_capture: bool
    prefill_chunk: int | None  # longest prefill run, a power of two; None: whole prompts
    continued_prefill: bool  # a multi-token run may follow a past (else token by token)
    by_address: bool  # buffers bound as parts of one block (else one OrtValue each)
    contract: str = OURS
    slots: int = 1  # sequences the KV cache holds, row i slot i, decoded together
    profile: str | None = None  # ONNX Runtime's profile goes to files with this prefix
    notes: tuple[str, ...] = ()  # what the user should know about this placement

    @property
    def dtype(self) -> type:
        """The numpy type of activations and of the KV cache."""
        return NP_DTYPES[self.activation]

    @property
    def pads(self) -> bool:
        """Whether a prefill run is padded up to a length seen at load: the packed forms take
        the position their logits come from (graph_forms.LOGITS_AT)."""
        return self.form != graph_forms.EXPORTED

    @property
    def outputs_on_device(self) -> bool:
        """Whether the logits (and, under graph capture, total_sequence_length) are bound to
        fixed device buffers, the logits copied back after each run. WebGPU needs it: a
        replayed captured graph does not refresh an output bound in host memory, and its
        GroupQueryAttention reads total_sequence_length on the GPU under capture, so a host
        value would be frozen into the captured graph."""
        return self.device == "webgpu"

    @property
    def on_host(self) -> bool:
        """Whether the weights and the KV cache live in host memory."""
        return self.device == "cpu"

    def kv_cache_shape(self, config: Config) -> tuple[int, int, int, int]:
        """One layer's K (or V) buffer, a row per slot: (slots, kv_heads, cache_len, head_dim)."""
        return kv_cache_shape(config, self.cache_len, self.slots)

    def kv_cache_bytes(self, config: Config) -> int:
        return kv_cache_bytes(config, self.cache_len, self.activation, self.slots)

    def zeros_from_session(self, nbytes: int) -> bool:
        """Whether a cache block of `nbytes` is allocated by a small zero-filling session
        (session.device_zeros) instead of ONNX Runtime's Python-side arena.

        That CUDA arena grows in powers of two and doubles its next growth: a power-of-two
        block costs exactly its size there if nothing is allocated from the arena after it
        (why the step inputs are allocated first), any other size is rounded up to the next
        power of two. device_zeros takes exactly what is asked but its session holds a little
        more, so it makes the other sizes."""
        return self.device == "cuda" and nbytes & (nbytes - 1) != 0

    def free_device_memory(self) -> int | None:
        """Free memory of the device the weights and cache live on (None: host, or unknown)."""
        return free_cuda_memory() if self.device == "cuda" else None

    def execution_providers(self) -> list:
        """ONNX Runtime's providers in priority order, with options; the CPU is the fallback.

        CUDA computes float32 matrix products in TF32 by default; float32 activations ask for
        full float32 so tokens match the reference."""
        cpu = PROVIDERS["cpu"]
        if self.provider == "cuda":
            # Grow the memory arena by what is asked, not to the next power of two.
            options = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
            if self.graph_capture:
                options["enable_cuda_graph"] = "1"
            if self.activation == "float32":
                options["use_tf32"] = "0"
            return [(PROVIDERS["cuda"], options), cpu]
        if self.provider == "dml":
            return [(PROVIDERS["dml"], {"device_id": "0"}), cpu]
        if self.provider == "webgpu":  # its session options select it (webgpu.add_to)
            return []
        return [cpu]

    def session_options(self) -> ort.SessionOptions:
        """Session options for this placement.

        Fixing `batch` and `cache_len` lets the providers plan memory and (on DirectML) reuse
        compiled kernels between steps; `seq` stays free for prefill. With several slots `batch`
        stays free too: a prefill runs one slot at batch 1, a decode step the slots at batch N.
        DirectML requires sequential execution and no memory pattern (ONNX Runtime's DirectML
        documentation).
        """
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.contract == OURS:
            if self.slots == 1:
                so.add_free_dimension_override_by_name("batch", 1)
            so.add_free_dimension_override_by_name("cache_len", self.cache_len)
        if self.profile:
            so.enable_profiling, so.profile_file_prefix = True, self.profile
        if self.provider == "cpu" and not cpu_spinning():
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.provider == "dml":
            so.enable_mem_pattern = False
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.provider == "webgpu":
            webgpu.add_to(so, self.graph_capture)
        return so


def kv_cache_shape(config: Config, cache_len: int, slots: int = 1
                   ) -> tuple[int, int, int, int]:
    """One layer's K (or V) buffer: (slots, kv_heads, cache_len, head_dim)."""
    return (slots, config.n_kv_heads, cache_len, config.head_dim)


def kv_cache_bytes(config: Config, cache_len: int, activation: str, slots: int = 1) -> int:
    """The whole KV cache, K and V of every layer for every slot, in `activation`'s type."""
    per_layer = int(np.prod(kv_cache_shape(config, cache_len, slots)))
    return 2 * config.n_layers * per_layer * np.dtype(NP_DTYPES[activation]).itemsize


def installed_providers() -> list[str]:
    """Short names of the providers this onnxruntime can run, in `auto`'s order (WebGPU when
    its plugin is installed and offers a device)."""
    available = ort.get_available_providers()
    return [p for p in AUTO_ORDER if PROVIDERS[p] in available
            or (p == "webgpu" and webgpu.available())]


def resolve_provider(name: str, installed: list[str] | None = None) -> str:
    """Turn `auto|dml|cuda|webgpu|cpu` into an installed provider's short name.

    Raises:
        UserError when the name is unknown or its provider is not installed; for WebGPU, the
        sentence that names what is missing (the plugin, the Vulkan loader, an adapter).
    """
    if name == "webgpu" and installed is None:
        webgpu.device()  # registers the plugin, or says what is missing
        return name
    installed = installed_providers() if installed is None else installed
    if name == "auto":
        return installed[0] if installed else "cpu"
    if name not in PROVIDERS:
        raise UserError(f"--provider {name!r} is not one of {', '.join(PROVIDER_CHOICES)}.")
    if name not in installed:
        names = ", ".join(PROVIDERS[p] for p in installed) or "no provider"
        raise UserError(f"--provider {name} needs the package {PACKAGES[name]}; this "
                        f"onnxruntime only has {names}.")
    return name


def place(config: Config, options: RunOptions, installed: list[str] | None = None,
          contract: str = OURS, float16: bool | None = None) -> Placement:
    """Decide where and how a variant described by `config` runs.

    Args:
        installed: the providers to choose from (default: what is installed).
        float16: whether the device computes in float16 (default: WebGPU's adapter is asked,
            webgpu.has_shader_f16; every other provider does).
    Raises:
        UserError for a provider that is not installed or cannot run this variant, graph
        capture where it is not shown token-identical, several slots where they are not
        offered, and a context longer than the variant's.
    """
    provider = _provider_for(config, options.provider, installed, contract)
    cache_len = context_length(config, options.max_seq_len)
    if float16 is None:
        float16 = provider != "webgpu" or config.dtype == "float32" or webgpu.has_shader_f16()
    form = _form(provider, config.dtype, contract, float16)
    wide = form in graph_forms.FLOAT32_FORMS and provider == "webgpu"
    if options.parallel == "auto":
        options = replace(options, parallel=1 if contract == ORIGINAL else auto_slots(
            provider, config, cache_len, _activation(form, config)))
    return Placement(
        provider=provider, device=provider if provider in ("cuda", "dml", "webgpu") else "cpu",
        form=form, activation=_activation(form, config),
        cache_len=cache_len, graph_capture=_graph_capture(provider, options, contract),
        prefill_chunk=_prefill_chunk(provider, options.prefill_chunk, cache_len, contract),
        # DirectML's GroupQueryAttention ignores the past when seq > 1 (ONNX Runtime's
        # DmlOperatorGroupQueryAttention), so continued prefill goes one token at a time there.
        continued_prefill=contract == ORIGINAL or provider != "dml",
        # DirectML and WebGPU buffers have no addresses to offset: each part is its own
        # OrtValue there.
        by_address=provider not in ("dml", "webgpu"), contract=contract,
        slots=_slots(provider, options.parallel, contract), profile=options.profile,
        notes=(f"this WebGPU adapter has no float16 arithmetic (shader-f16), so this "
               f"{config.dtype} variant computes in float32 (its KV cache takes twice the "
               "memory).",) if wide else ())


def _provider_for(config: Config, requested: str, installed: list[str] | None,
                  contract: str) -> str:
    """ONNX Runtime's CUDA GroupQueryAttention exists for float16 only (OperatorKernels.md),
    so our float32 graph on CUDA would run attention on the CPU; that split gave wrong logits
    from the second decode step, so float32 variants run on the CPU: `auto` picks it,
    `--provider cuda` is refused. The original format has no GroupQueryAttention."""
    provider = resolve_provider(requested, installed)
    if provider == "cuda" and config.dtype == "float32" and contract == OURS:
        if requested == "auto":
            return "cpu"
        raise UserError("float32 variants run on the CPU (ONNX Runtime has no float32 CUDA "
                        "attention kernel); use a float16 or int4 variant with --provider cuda, "
                        "or --provider cpu.")
    return provider


def _form(provider: str, dtype: str, contract: str, float16: bool = True) -> str:
    """DirectML (and the original format) run the graph as exported; the CPU's int4 variants,
    and float16/int4 ones on a device without float16 arithmetic (a WebGPU adapter without
    shader-f16), in float32; the rest the packed form (graph_forms). WebGPU's
    GroupQueryAttention takes the packed form (packed qkv, built-in rotary); its float16
    variants split their products along K (graph_forms.SPLIT_K: 2.2x the decode speed on an
    H200, and closer to a float32 reference than the packed form; docs/benchmarks.md)."""
    if provider == "dml" or contract == ORIGINAL:
        return graph_forms.EXPORTED
    if dtype != "float32" and (not float16 or (provider == "cpu" and dtype == "int4")):
        return graph_forms.PACKED_FLOAT32
    if provider == "webgpu" and dtype == "float16":
        return graph_forms.SPLIT_K
    return graph_forms.PACKED


def _activation(form: str, config: Config) -> str:
    if form in graph_forms.FLOAT32_FORMS:
        return "float32"
    return np.dtype(NP_DTYPES[config.dtype]).name


# Where decode-step graph capture is shown token-identical to the uncaptured path: CUDA over a
# long scripted chat with sampling, regenerate, removed turns and clipping
# (tools/graph_capture_check.py), WebGPU over tests/test_webgpu.py and that script. The CPU
# has no capture: asking for it there runs the captured path's bindings (whole-cache total
# length), which tests compare with the plain path. DirectML's has never been run.
# On by default where also faster: CUDA, and WebGPU (NVIDIA H200 through Vulkan, random 7B,
# 128 -> 256 greedy, the same tokens captured and not: int4 127.2 against 113.5 tokens/s,
# float16 35.1 against 33.8; tools/gpu_bench.sh webgpu).
CAPTURE_SHOWN = ("cuda", "webgpu", "cpu")
CAPTURE_DEFAULT = ("cuda", "webgpu")


def _graph_capture(provider: str, options: RunOptions, contract: str) -> bool:
    """On by default where shown and faster (CUDA, WebGPU); refused where not shown; the
    original format's runtime has no fixed buffers to capture. A decode step of several slots
    is captured once per width it runs at (session.Runtime.run_rows), shown token-identical
    wherever slots are offered (SLOTS_OFFERED)."""
    if contract == ORIGINAL:
        if options.graph_capture is True:
            raise UserError("graph capture needs this repository's graph contract; the "
                            "original Llama-2-Onnx format runs without it (drop "
                            "--graph_capture).")
        return False
    if options.graph_capture == "auto":
        return provider in CAPTURE_DEFAULT
    if options.graph_capture and provider not in CAPTURE_SHOWN:
        raise UserError(f"graph capture is not shown to give the same tokens on {provider} "
                        "yet, so it is not offered there; drop --graph_capture.")
    return bool(options.graph_capture)


# Where several slots share one KV cache: each layer's buffer holds a row per slot, a prefill is
# bound into its slot's row by address and a decode step runs the rows together, each with its
# own seqlens_k. DirectML and WebGPU buffers have no addresses to offset into (and DirectML's
# GroupQueryAttention reads per-row lengths only for single-token steps); the original format's
# runtime holds one sequence. On both, a decode step of several slots captured once per width
# is shown token-identical to the uncaptured one: the CPU runs the captured path's bindings
# (tests/test_parallel.py), CUDA on an H200 (tools/slots_capture_check.py, docs/serving.md); a
# provider added here needs that shown first, or _graph_capture must refuse it.
SLOTS_OFFERED = ("cuda", "cpu")


# The server's default slots (tools/serve.py; RunOptions.parallel "auto"): on CUDA as many as
# fit in AUTO_SLOTS_SHARE of the GPU memory free beside the weights, at most AUTO_SLOTS_CAP:
# measured on an H200 (7B float16, 128-token prompts, 128 new tokens; docs/serving.md), 16
# slots gave 7.4x the tokens/s of one at 16 clients with every stream above half a lone
# stream's speed, while 64 slots at 64 clients gave 1.4x more in all but streams at a quarter
# of it. The rest of that memory is left for activations and other programs. Elsewhere one:
# the CPU's rows compete for its few cores (each stream slows down as more share a step), and
# DirectML and WebGPU offer no slots.
AUTO_SLOTS_CAP = {"cuda": 16}
AUTO_SLOTS_SHARE = 0.5


def auto_slots(provider: str, config: Config, cache_len: int, activation: str,
               free: int | None = None) -> int:
    """The server's default number of slots (see AUTO_SLOTS_CAP); `free`: the device's free
    memory in bytes (default: asked of the device; unknown gives one slot)."""
    cap = AUTO_SLOTS_CAP.get(provider, 1)
    if cap == 1:
        return 1
    if free is None:
        free = free_cuda_memory() if provider == "cuda" else None
    if not free:
        return 1
    room = AUTO_SLOTS_SHARE * (free - config.weight_bytes())
    slot = kv_cache_bytes(config, cache_len, activation)
    return int(max(1, min(cap, room // slot)))


def _slots(provider: str, parallel: int, contract: str) -> int:
    if parallel == 1:
        return 1
    if contract == ORIGINAL:
        raise UserError(f"--parallel {parallel} needs this repository's graph contract; the "
                        "original Llama-2-Onnx format runs one request at a time (drop "
                        "--parallel).")
    if provider not in SLOTS_OFFERED:
        raise UserError(f"--parallel {parallel} is not offered on {provider}, which runs one "
                        "request at a time (its buffers cannot be bound a row at a time); drop "
                        "--parallel, or use --provider cuda or cpu.")
    return parallel


def _prefill_chunk(provider: str, asked: int | str | None, cache_len: int, contract: str
                   ) -> int | None:
    chunk = PREFILL_CHUNK.get(provider) if asked == "auto" else asked
    if chunk is None or contract == ORIGINAL:
        return None
    return 1 << (min(chunk, cache_len).bit_length() - 1)


def context_length(config: Config, max_seq_len: int | None) -> int:
    """The KV cache's length: the model's context, or a shorter one asked for.

    Raises:
        UserError when more than the variant's context is asked for.
    """
    if max_seq_len is None:
        return config.max_seq_len
    if not 1 < max_seq_len <= config.max_seq_len:
        raise UserError(f"--max_seq_len {max_seq_len} must be between 2 and "
                        f"{config.max_seq_len} for this variant.")
    return max_seq_len


def cpu_spinning(load: float | None = None, cores: int | None = None) -> bool:
    """Whether ONNX Runtime's CPU worker threads spin between operators (its default) rather
    than sleep. Spinning wins on a machine with cores to spare and loses badly on one busy
    with other work (docs/benchmarks.md), so it is on only when the 1-minute load average
    leaves a core free; LLAMA2_ONNX_CPU_SPIN=1 or 0 decides instead."""
    forced = os.environ.get("LLAMA2_ONNX_CPU_SPIN")
    if forced in ("0", "1"):
        return forced == "1"
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): ONNX Runtime's default
            return True
    return load <= (cores or os.cpu_count() or 1) - 1
