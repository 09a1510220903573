"""ONNX Runtime sessions in the placement's form and options, and the device-resident KV cache.

KV cache layout (graph contract, see graph.py): one buffer per layer and per K/V of shape
(slots, kv_heads, cache_len, head_dim), allocated once on the device and zero-filled; row i
holds slot i's sequence (one row unless the placement has several slots). Each buffer is
bound as both `past_*` input and `present_*` output, so GroupQueryAttention writes the new
positions in place; which positions are valid is told by `seqlens_k`/`total_sequence_length`,
so rewinding the cache (a new chat turn that shares a prefix) costs nothing. With several
slots a prefill runs at batch 1 bound to its slot's row (rows are contiguous, so a row is an
address offset), and a decode step runs the first k rows at batch k, each row with its own
position and `seqlens_k` (GroupQueryAttention refuses several new tokens per row at batch > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from . import graph_forms, webgpu
from .config import Config
from .errors import VariantError
from .placement import Placement

if TYPE_CHECKING:
    from .tokenizer import HFTokenizer, Tokenizer

OPSET_ZEROS = 17
# Runs of a graph id until ONNX Runtime's CUDA provider has captured it: two plain runs, then
# the capture (its min_num_runs_before_cuda_graph_capture_ is 2).
CAPTURE_RUNS = 3


def create_session(graph: Path, placement: Placement) -> ort.InferenceSession:
    """Open the graph in the form the placement runs (graph_forms), its weights read in place.

    Args:
        placement: where and how it runs; graph_forms.EXPORTED opens the file as it is,
            another form is derived from its nodes in memory (the weights stay in the
            variant's data file).
    Raises:
        VariantError when ONNX Runtime cannot load the files.
    """
    providers, form = placement.execution_providers(), placement.form
    so = placement.session_options()
    if form == graph_forms.EXPORTED:
        return _open(graph, str(graph), so, providers)
    try:
        model = onnx.load(str(graph), load_external_data=False)
        graph_forms.to_form(model, form, graph.parent)
    except (OSError, ValueError, DecodeError) as exc:
        raise VariantError(f"{graph} is not a graph of this exporter ({exc}); re-export the "
                           "variant or check it with `python tools/export_and_publish.py "
                           "verify <variant>`.") from None
    # The derived graph names its weights by their place in the variant's data file.
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(graph.parent))
    return _open(graph, model.SerializeToString(), so, providers)


def _open(path: Path, model: str | bytes, so: ort.SessionOptions, providers: list
          ) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises Fail, InvalidProtobuf, RuntimeException...
        webgpu.check_session_error(exc)  # WebGPU's "no adapter" is not the files' fault
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise VariantError(f"ONNX Runtime cannot load {path} ({first}); check the files with "
                           "`python tools/export_and_publish.py verify <variant>`.") from None


def device_zeros(session: ort.InferenceSession, count: int, dtype: type,
                 device: str = "cuda") -> tuple:
    """`count` zeros of `dtype` in one allocation on `session`'s CUDA device (or the CPU, for
    tests), written there.

    A tiny session of its own (ConstantOfShape) allocates them from an arena that grows by what
    is asked; ONNX Runtime's Python-side allocator rounds up to powers of two (a 7B float16's
    cache could take twice its size) and would copy the zeros from the host.

    Returns:
        (OrtValue, the session whose arena holds it): keep both for as long as it is used.
    """
    from onnx import TensorProto, helper

    kind = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    fill = helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                            value=helper.make_tensor("value", kind, [1], [0]))
    graph = helper.make_graph(
        [fill], "zeros", [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("zeros", kind, ["count"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_ZEROS)])
    model.ir_version = 8
    provider = next(iter(session.get_provider_options()))
    options = dict(session.get_provider_options()[provider])
    options.pop("enable_cuda_graph", None)
    if "arena_extend_strategy" in options:
        options["arena_extend_strategy"] = "kSameAsRequested"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    maker = ort.InferenceSession(model.SerializeToString(), so,
                                 providers=[(provider, options)])
    binding = maker.io_binding()
    binding.bind_cpu_input("shape", np.array([count], np.int64))
    binding.bind_output("zeros", device, int(options.get("device_id", 0)))
    maker.run_with_iobinding(binding)
    return binding.get_outputs()[0], maker


@dataclass
class EngineParts:
    """What an Engine is built from: the runner that holds the KV cache (Runtime, or the
    original format's LegacyRuntime) and the host-side parts read from the variant's files."""

    runner: Any
    tokenizer: Tokenizer | HFTokenizer
    embeddings: np.ndarray
    config: Config
    name: str
    notes: list[str] = field(default_factory=list)
    files: FileStamps | None = None  # the files the session reads in place


class FileStamps:
    """Size, modification time and inode of files a session keeps reading after it opened
    them. ONNX Runtime maps a CPU session's weights file into memory, so truncating or
    replacing it under a running process kills it (SIGBUS, no message); checked before every
    generation, a changed file is refused in one sentence instead (a change during one
    generation cannot be caught: docs/design.md)."""

    def __init__(self, paths: list[Path]) -> None:
        self.stamps = {path: self._stamp(path) for path in paths}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None
        return info.st_size, info.st_mtime_ns, info.st_ino

    def changed(self) -> Path | None:
        """The first file that changed since these stamps were taken, else None."""
        return next((p for p, s in self.stamps.items() if self._stamp(p) != s), None)


class Runtime:
    """Runs our graph contract with IO binding; only embeddings and a few integers go in and
    last-position logits come out per call."""

    def __init__(self, session: ort.InferenceSession, config: Config,
                 placement: Placement) -> None:
        self.session, self.config, self.placement = session, config, placement
        self.provider, self.device = placement.provider, placement.device
        self.cache_len, self.dtype = placement.cache_len, placement.dtype
        # Prefill runs in power-of-two chunks up to max_chunk (None: the whole input at once).
        self.max_chunk = placement.prefill_chunk
        self.supports_continued_prefill = placement.continued_prefill
        # A packed graph form takes the position its logits come from (graph_forms.LOGITS_AT),
        # so a prefill run shorter than a length seen at load is padded up to one.
        self.pads = placement.pads
        self.binding = session.io_binding()
        self._keep: list = []  # host arrays and device blocks that bound addresses point into
        # Where the placement binds by address, the KV cache is one allocation, and so are a
        # decode step's three inputs, their parts bound by address: one copy to the device per
        # step instead of three, and a cache that takes exactly its size (as 64 buffers it grew
        # ONNX Runtime's arena by more). Otherwise each part is its own OrtValue.
        self.by_address = placement.by_address
        self.slots = placement.slots  # rows of the cache (see the module docstring)
        self._step_buffers()  # before the cache: see _cache_block
        self.caches = self._bind_caches()  # the device address of each cache buffer
        self.logits = np.zeros((self.slots, 1, config.vocab_size), np.float32)
        self.logits_value = self._value(self.logits, on_host=True)
        # Where the placement keeps outputs on the device (WebGPU), the logits land in a fixed
        # device buffer copied into self.logits after each run, and under graph capture
        # total_sequence_length is a device buffer too (Placement.outputs_on_device).
        on_device = placement.outputs_on_device
        self.logits_device = self._value(self.logits, on_host=False) if on_device else None
        self.binding.bind_ortvalue_output(
            "logits", self.logits_value if self.logits_device is None else self.logits_device)
        self.total = np.zeros((), np.int32)
        self.total_on_device = on_device and placement.graph_capture
        self.total_value = self._value(self.total, on_host=not self.total_on_device)
        self.binding.bind_ortvalue_input("total_sequence_length", self.total_value)
        self.step_bound = False
        # With graph capture on, decode steps (fixed shapes and addresses) replay graph 1;
        # prefill runs, whose shapes vary, opt out with id -1.
        self.decode_options, self.prefill_options = ort.RunOptions(), ort.RunOptions()
        if placement.graph_capture:
            self.decode_options.add_run_config_entry("gpu_graph_id", "1")
            self.prefill_options.add_run_config_entry("gpu_graph_id", "-1")
        self.run_options, self.graph_capture = self.decode_options, placement.graph_capture
        self._run = self._fast_run(self.binding)
        self._slot_binding()

    def _slot_binding(self) -> None:
        """With several slots a run of one slot has a binding of its own, pointed at its row
        (_bind_row), and decode steps bind the first `width` rows (_bind_width); with one,
        every run binds the whole cache."""
        self.row_binding, self.row, self.width = None, None, None
        if self.slots == 1:
            return
        placement = self.placement
        assert self.by_address and not placement.outputs_on_device, placement
        # Under graph capture each width's step is its own graph (id = the width; prefill
        # runs opt out): a replay reuses the addresses bound when it was captured, which for a
        # width are always the same (_bind_width binds the first rows of fixed blocks).
        self.width_options: dict[int, ort.RunOptions] = {}
        self.row_binding = self.session.io_binding()
        self.row_binding.bind_ortvalue_input("total_sequence_length", self.total_value)
        self._run_in_row = self._fast_run(self.row_binding)

    def _fast_run(self, binding: ort.IOBinding):
        """Call the native Run directly when this onnxruntime exposes it: the Python wrapper's
        per-call checks cost more than a whole decode step of a small model on the CPU."""
        native = getattr(self.session, "_sess", None)
        inner = getattr(binding, "_iobinding", None)
        if native is None or inner is None:
            return lambda options: self.session.run_with_iobinding(binding, options)
        return lambda options: native.run_with_iobinding(inner, options)

    def _value(self, array: np.ndarray, on_host: bool | None = None) -> ort.OrtValue:
        """An OrtValue of `array` where the placement keeps buffers (or in host memory)."""
        if self.placement.on_host if on_host is None else on_host:
            self._keep.append(array)  # the OrtValue points into this array
            return ort.OrtValue.ortvalue_from_numpy(array)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def _bind_caches(self) -> list[int]:
        shape = self.placement.kv_cache_shape(self.config)
        self.cache_names = names = [f"{kind}.{i}" for i in range(self.config.n_layers)
                                    for kind in ("key", "value")]
        if not self.by_address:
            zeros = np.zeros(shape, self.dtype)
            # On the CPU an OrtValue points into its array: each buffer needs its own.
            values = [self._value(zeros.copy() if self.placement.on_host else zeros)
                      for _ in names]
            self._keep += values
            for name, value in zip(names, values, strict=True):
                self.binding.bind_ortvalue_input(f"past_{name}", value)
                self.binding.bind_ortvalue_output(f"present_{name}", value)
            return [v.data_ptr() for v in values]
        # (2 * n_layers, slots, kv_heads, cache_len, head_dim): key.0, value.0, key.1, ...
        block = self._cache_block(len(names) * int(np.prod(shape)))
        layer = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        addresses = [block.data_ptr() + k * layer for k in range(len(names))]
        for name, address in zip(names, addresses, strict=True):
            for bind, kind in ((self.binding.bind_input, "past"),
                               (self.binding.bind_output, "present")):
                bind(f"{kind}_{name}", self.device, 0, self.dtype, shape, address)
        return addresses

    def _cache_block(self, count: int) -> ort.OrtValue:
        """`count` zeros where attention runs, in one allocation (Placement.zeros_from_session)."""
        if self.placement.zeros_from_session(count * np.dtype(self.dtype).itemsize):
            block, maker = device_zeros(self.session, count, self.dtype, self.device)
            self._keep.append(maker)
        else:
            block = self._value(np.zeros(count, self.dtype))
        self._keep.append(block)
        return block

    def _step_buffers(self) -> None:
        """A decode step's inputs: views (self.step) into one host block, 256-byte aligned
        like ONNX Runtime's own allocations, and where the device reads them."""
        rows = self.slots  # a decode step's inputs have a row per slot
        self.step_fields = {"inputs_embeds": ((rows, 1, self.config.dim), self.dtype),
                            "position_ids": ((rows, 1), np.int64),
                            "seqlens_k": ((rows,), np.int32)}
        if self.pads:  # a decode step's logits are at its only position, 0
            self.step_fields[graph_forms.LOGITS_AT] = ((1,), np.int64)
        self.step_offsets, size = {}, 0
        for name, (shape, dtype) in self.step_fields.items():
            self.step_offsets[name] = size
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 256) * 256
        self.step_host = np.zeros(size, np.uint8)
        self.step = {}
        for name, (shape, dtype) in self.step_fields.items():
            view = self.step_host[self.step_offsets[name]:].view(dtype)
            self.step[name] = view[:int(np.prod(shape))].reshape(shape)
        if self.by_address:
            self.step_block, self.step_values = self._value(self.step_host), None
        else:
            self.step_block = None
            self.step_values = {name: self._value(self.step[name])
                                for name in self.step_fields}

    def _bind_step_inputs(self) -> None:
        if self.step_values is not None:
            for name, value in self.step_values.items():
                self.binding.bind_ortvalue_input(name, value)
            return
        base = self.step_block.data_ptr()
        for name, (shape, dtype) in self.step_fields.items():
            self.binding.bind_input(name, self.device, 0, dtype, shape,
                                    base + self.step_offsets[name])

    def run(self, embeds: np.ndarray, start: int, row: int = 0) -> np.ndarray:
        """Process `embeds` (seq, dim) at positions start..start+seq-1 of slot `row`.

        With chunked prefill, a run whose length is not one of prefill_lengths() is padded
        with zero rows up to the next one (padded_length); the padding's keys and values land
        past the real end of the cache, where the next run overwrites them and nothing reads
        them before (seqlens_k tells attention where the real tokens end).

        Returns:
            float32 logits (vocab,) for the last position (a view, valid until the next call).
        """
        seq = embeds.shape[0]
        assert 0 < seq and start + seq <= self.cache_len, (start, seq, self.cache_len)
        assert 0 <= row < self.slots, (row, self.slots)
        padded = self.padded_length(seq)
        assert start + padded <= self.cache_len, (start, padded, self.cache_len)
        if padded != seq:  # one copy, already in the session's type (_run_once copies no more)
            rows = np.zeros((padded, embeds.shape[1]), self.dtype)
            rows[:seq] = embeds
            embeds = rows
        if self.slots > 1:
            self._run_row(embeds, start, seq, row)
        else:
            self._run_once(embeds, start, real=seq)
        return self.logits[row, 0]

    def padded_length(self, seq: int) -> int:
        """How long a run of `seq` new tokens reaches ONNX Runtime (`seq` unless padded)."""
        if not self.pads or self.max_chunk is None or seq > self.max_chunk:
            return seq
        return 1 << (seq - 1).bit_length()

    def prefill_lengths(self) -> list[int]:
        """Every input length a prefill reaches ONNX Runtime with (empty: any length); the
        engine splits prompts with generation.prefill_spans."""
        if self.max_chunk is None:
            return []
        return [1 << i for i in range(self.max_chunk.bit_length())]

    def warm_up(self) -> None:
        """Run every chunk length once, so no input shape is new to ONNX Runtime during a chat
        (a new shape costs a lot on CUDA the first time: docs/design.md). The cache contents
        written here are garbage that the next prefill overwrites: only positions below
        `seqlens_k` count."""
        zeros = np.zeros((max(self.prefill_lengths(), default=1), self.config.dim), self.dtype)
        for size in self.prefill_lengths():
            if self.slots > 1:
                self._run_row(zeros[:size], 0, size, 0)
            else:
                self._run_once(zeros[:size], 0)

    def warm_up_decode(self) -> None:
        """With several slots, run a decode step of each width (at position 1 of every row;
        garbage, as in warm_up) where every shape is seen before use, and under graph capture
        enough times to capture each width's graph now: ONNX Runtime's CUDA provider captures
        on a graph's third run and keeps it in the calling thread's context, so this runs on
        the thread that will decode (batching.SlotEngine calls it), and a width is never first
        captured in the middle of a burst of requests."""
        if self.slots == 1 or not (self.graph_capture or self.max_chunk is not None):
            return
        for width in sorted({self.decode_width(k) for k in range(1, self.slots + 1)}):
            for _ in range(CAPTURE_RUNS if self.graph_capture else 1):
                self.run_rows(np.zeros((width, self.config.dim), self.dtype), [1] * width)

    def _run_once(self, embeds: np.ndarray, start: int, real: int | None = None) -> None:
        """One run over `embeds`, of which the first `real` rows (default: all) are tokens."""
        seq = embeds.shape[0]
        # A captured decode graph replays host-side values as they were at capture, so with
        # graph capture decode steps say "up to the whole cache" and seqlens_k (on the device)
        # tells the real length; prefill always states its exact total.
        decode_total = self.cache_len if self.graph_capture else start + 1
        self.total[...] = decode_total if seq == 1 else start + seq
        if self.total_on_device:
            self.total_value.update_inplace(self.total)
        self.run_options = self.decode_options if seq == 1 else self.prefill_options
        if seq == 1:
            self._bind_step(embeds, start)
        else:
            self.step_bound = False
            self._bind_run_inputs(self.binding, embeds, start, real or seq)
        self._run(self.run_options)
        if self.logits_device is not None:
            ort.copy_tensors([self.logits_device], [self.logits_value])

    def _bind_run_inputs(self, b: ort.IOBinding, embeds: np.ndarray, start: int,
                         real: int) -> None:
        """A run's inputs from host memory, for runs whose shapes vary (prefill)."""
        seq = embeds.shape[0]
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], self.dtype))
        b.bind_cpu_input("position_ids", np.arange(start, start + seq, dtype=np.int64)[None])
        b.bind_cpu_input("seqlens_k", np.array([start + seq - 1], np.int32))
        if self.pads:
            b.bind_cpu_input(graph_forms.LOGITS_AT, np.array([real - 1], np.int64))

    def _run_row(self, embeds: np.ndarray, start: int, real: int, row: int) -> None:
        """One run of slot `row` alone, at batch 1 (several slots; never captured)."""
        self.total[...] = start + embeds.shape[0]
        if self.row != row:
            self._bind_row(row)
        self._bind_run_inputs(self.row_binding, embeds, start, real)
        self._run_in_row(self.prefill_options)

    def _bind_row(self, row: int) -> None:
        """Point the one-slot binding at slot `row`: its row of every cache buffer, and its row
        of the logits."""
        shape = (1, *self.placement.kv_cache_shape(self.config)[1:])
        offset = row * int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        b = self.row_binding
        for name, address in zip(self.cache_names, self.caches, strict=True):
            b.bind_input(f"past_{name}", self.device, 0, self.dtype, shape, address + offset)
            b.bind_output(f"present_{name}", self.device, 0, self.dtype, shape, address + offset)
        b.bind_output("logits", "cpu", 0, np.float32, (1, 1, self.config.vocab_size),
                      self.logits[row].ctypes.data)
        self.row = row

    def run_rows(self, embeds: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        """One decode step of slots 0..k-1 together (k = len(positions), a decode_width()):
        slot i's one new token, embeds[i] (k, dim), at position positions[i] < cache_len.

        A slot with no token to run is given its own length as position (and any embedding):
        what the step writes lands past its end, where its next run overwrites it and nothing
        reads it before (as the padding in run()).

        Returns:
            float32 logits (k, vocab) (a view, valid until the next call).
        """
        k = len(positions)
        if self.slots == 1:  # the one-sequence decode step
            return self.run(embeds[:1], int(positions[0]))[None]
        assert 0 < k <= self.slots and max(positions) < self.cache_len, (k, positions)
        self.step["inputs_embeds"][:k, 0] = embeds
        self.step["position_ids"][:k, 0] = positions
        self.step["seqlens_k"][:k] = positions
        # Each row reads up to its own seqlens_k; a captured step says "up to the whole cache"
        # as a captured one-slot step does (_run_once).
        self.total[...] = self.cache_len if self.graph_capture else max(positions) + 1
        if not self.placement.on_host:
            self.step_block.update_inplace(self.step_host)
        if self.width != k:
            self._bind_width(k)
        self._run(self._width_options(k))
        return self.logits[:k, 0]

    def _width_options(self, k: int) -> ort.RunOptions:
        """The run options of a decode step of width k: under graph capture, graph k's."""
        if not self.graph_capture:
            return self.decode_options
        if k not in self.width_options:
            self.width_options[k] = options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(k))
        return self.width_options[k]

    def _bind_width(self, k: int) -> None:
        """Bind decode steps to the first k rows of the step inputs, the caches and the logits
        (each buffer's first k rows start where it does)."""
        base, b = self.step_block.data_ptr(), self.binding
        for name, (shape, dtype) in self.step_fields.items():
            rows = shape if name == graph_forms.LOGITS_AT else (k, *shape[1:])
            b.bind_input(name, self.device, 0, dtype, rows, base + self.step_offsets[name])
        shape = (k, *self.placement.kv_cache_shape(self.config)[1:])
        for name, address in zip(self.cache_names, self.caches, strict=True):
            b.bind_input(f"past_{name}", self.device, 0, self.dtype, shape, address)
            b.bind_output(f"present_{name}", self.device, 0, self.dtype, shape, address)
        b.bind_output("logits", "cpu", 0, np.float32, (k, 1, self.config.vocab_size),
                      self.logits.ctypes.data)
        self.width = k

    def decode_width(self, rows: int) -> int:
        """The batch a decode step of slots 0..rows-1 runs at: `rows`, or where every input
        shape is seen at load (prefill chunks, warm_up), the next power of two (at most all
        slots); run_rows then gets a position for each row up to it."""
        if self.max_chunk is None:
            return rows
        return min(1 << (rows - 1).bit_length(), self.slots)

    def _bind_step(self, embeds: np.ndarray, start: int) -> None:
        self.step["inputs_embeds"][0, 0] = embeds[0]
        self.step["position_ids"][0, 0] = start
        self.step["seqlens_k"][0] = start
        if not self.placement.on_host:  # on the host the inputs are bound where self.step is
            if self.step_block is not None:
                self.step_block.update_inplace(self.step_host)
            else:
                for name, value in self.step_values.items():
                    value.update_inplace(self.step[name])
        if not self.step_bound:  # a prefill bound other inputs; decode steps reuse these
            self._bind_step_inputs()
            self.step_bound = True
