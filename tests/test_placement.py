"""Where and how a variant runs (placement.place): each rule in one place, tested without a GPU
by stating which providers are installed."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from llama2_onnx import graph_forms, placement, webgpu
from llama2_onnx.config import Config
from llama2_onnx.errors import UserError
from llama2_onnx.placement import (
    ORIGINAL,
    PROVIDERS,
    RunOptions,
    auto_slots,
    cpu_spinning,
    installed_providers,
    place,
    resolve_provider,
)

ALL = ["dml", "cuda", "webgpu", "cpu"]


def config(dtype: str = "float16", max_seq_len: int = 64) -> Config:
    return Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dtype=dtype, max_seq_len=max_seq_len,
                  block_size=32 if dtype == "int4" else None)


def placed(provider: str, dtype: str = "float16", installed=ALL, float16=True, **options):
    return place(config(dtype), RunOptions(provider=provider, **options), installed,
                 float16=float16)


def test_providers_that_are_not_installed_name_their_package():
    """Holds whichever onnxruntime package is installed (plain, -gpu or -directml)."""
    installed = installed_providers()
    for short, package in (("cuda", "onnxruntime-gpu"), ("dml", "onnxruntime-directml")):
        if short in installed:
            assert resolve_provider(short) == short
        else:
            with pytest.raises(UserError, match=package):
                resolve_provider(short)
    assert resolve_provider("auto") == installed[0]  # auto's documented order
    assert installed == [p for p in ("dml", "cuda", "webgpu", "cpu")
                         if PROVIDERS[p] in ort.get_available_providers()
                         or (p == "webgpu" and webgpu.available())]
    assert resolve_provider("auto", ["cuda", "cpu"]) == "cuda"


def test_each_provider_runs_its_form_in_its_activation_type():
    expected = {("dml", "float16"): (graph_forms.EXPORTED, "float16"),
                ("dml", "int4"): (graph_forms.EXPORTED, "float16"),
                ("cuda", "float16"): (graph_forms.PACKED, "float16"),
                ("cuda", "int4"): (graph_forms.PACKED, "float16"),
                ("cpu", "float16"): (graph_forms.PACKED, "float16"),
                ("cpu", "float32"): (graph_forms.PACKED, "float32"),
                ("cpu", "int4"): (graph_forms.PACKED_FLOAT32, "float32")}
    for (provider, dtype), (form, activation) in expected.items():
        p = placed(provider, dtype)
        assert (p.form, p.activation) == (form, activation), (provider, dtype)
        assert p.pads == (form != graph_forms.EXPORTED)


def test_float32_variants_are_refused_on_cuda_and_auto_takes_the_cpu():
    """float32 never runs on CUDA, where its attention would split between host and device
    and give wrong logits; the original format has no GroupQueryAttention, so it may."""
    with pytest.raises(UserError, match="float32 variants run on the CPU"):
        placed("cuda", "float32")
    assert placed("auto", "float32", installed=["cuda", "cpu"]).provider == "cpu"
    assert placed("cuda", "float16").provider == "cuda"
    original = place(config("float32"), RunOptions(provider="cuda"), ALL, contract=ORIGINAL)
    assert original.provider == "cuda" and original.form == graph_forms.EXPORTED


def test_webgpu_runs_the_packed_form_and_widens_where_the_adapter_lacks_float16():
    for dtype in ("float32", "float16", "int4"):
        p = placed("webgpu", dtype)
        form = graph_forms.SPLIT_K if dtype == "float16" else graph_forms.PACKED
        assert (p.device, p.form, p.by_address, p.outputs_on_device) == (
            "webgpu", form, False, True)
        assert p.activation == ("float32" if dtype == "float32" else "float16") and not p.notes
        wide = placed("webgpu", dtype, float16=False)
        if dtype == "float32":
            assert wide.form == graph_forms.PACKED and not wide.notes
        elif dtype == "float16":  # no float16 arithmetic: no float16 products to split
            assert (wide.form, wide.activation) == (graph_forms.PACKED_FLOAT32, "float32")
        else:
            assert (wide.form, wide.activation) == (graph_forms.PACKED_FLOAT32, "float32")
            assert len(wide.notes) == 1 and "shader-f16" in wide.notes[0]
    assert placed("webgpu").execution_providers() == []  # its session options select it
    assert not placed("cuda").outputs_on_device and not placed("cpu").outputs_on_device


def test_auto_takes_webgpu_only_without_a_vendors_provider():
    assert resolve_provider("auto", ["webgpu", "cpu"]) == "webgpu"
    assert resolve_provider("auto", ["cuda", "webgpu", "cpu"]) == "cuda"
    assert resolve_provider("auto", ["dml", "webgpu", "cpu"]) == "dml"
    with pytest.raises(UserError, match="onnxruntime-ep-webgpu"):
        resolve_provider("webgpu", ["cpu"])


def test_devices_binding_and_continued_prefill_per_provider():
    dml, cuda, cpu = placed("dml"), placed("cuda"), placed("cpu")
    assert (dml.device, cuda.device, cpu.device) == ("dml", "cuda", "cpu")
    assert (dml.by_address, cuda.by_address, cpu.by_address) == (False, True, True)
    # DirectML's GroupQueryAttention ignores the past when seq > 1.
    assert (dml.continued_prefill, cuda.continued_prefill, cpu.continued_prefill) == (
        False, True, True)
    assert cpu.on_host and not cuda.on_host


def test_graph_capture_is_on_by_default_where_shown_and_refused_for_the_original_format():
    assert placed("cuda").graph_capture and not placed("cpu").graph_capture
    assert placed("webgpu").graph_capture  # token-identical and faster on an H200 (Vulkan)
    assert not placed("webgpu", graph_capture=False).graph_capture
    assert not placed("cuda", graph_capture=False).graph_capture
    assert not placed("dml").graph_capture  # never run there: refused, never silently on
    with pytest.raises(UserError, match="not shown to give the same tokens on dml"):
        placed("dml", graph_capture=True)
    with pytest.raises(UserError, match="original Llama-2-Onnx format runs without it"):
        place(config(), RunOptions(provider="cpu", graph_capture=True), ALL, contract=ORIGINAL)


def test_prefill_chunks_are_powers_of_two_within_the_cache():
    assert placed("cuda").prefill_chunk == 64  # 1024 by default, clipped to the 64-token cache
    assert placed("cpu").prefill_chunk is None and placed("dml").prefill_chunk is None
    assert placed("cpu", prefill_chunk=20).prefill_chunk == 16
    assert placed("cuda", prefill_chunk=None).prefill_chunk is None


def test_cache_length_and_size_come_from_one_rule():
    p = placed("cpu", max_seq_len=32)
    assert p.cache_len == 32 and p.kv_cache_shape(config()) == (1, 2, 32, 16)
    assert p.kv_cache_bytes(config()) == 2 * 2 * (2 * 32 * 16) * 2  # layers, K/V, float16
    wide = placed("cpu", "int4", max_seq_len=32)
    assert wide.kv_cache_bytes(config("int4")) == 2 * p.kv_cache_bytes(config())
    with pytest.raises(UserError, match="between 2 and 64"):
        placed("cpu", max_seq_len=65)


@pytest.mark.parametrize("options, message", [
    ({"provider": "tpu"}, "is not one of auto"), ({"max_seq_len": 1}, "too short"),
    ({"max_seq_len": 0}, "too short"), ({"prefill_chunk": 0}, "at least 1"),
    ({"graph_capture": "yes"}, "on, off or auto")])
def test_run_options_refuse_bad_values_with_one_sentence(options, message):
    with pytest.raises(UserError, match=message):
        RunOptions(**options)


def test_power_of_two_caches_come_from_the_arena_others_from_a_session():
    cuda = placed("cuda")
    assert not cuda.zeros_from_session(2 << 30) and not cuda.zeros_from_session(1 << 20)
    assert cuda.zeros_from_session(3 << 29) and cuda.zeros_from_session((2 << 30) + 256)
    assert not placed("cpu").zeros_from_session(3 << 29)


def test_cpu_threads_spin_only_with_a_core_to_spare(monkeypatch):
    monkeypatch.delenv("LLAMA2_ONNX_CPU_SPIN", raising=False)
    assert cpu_spinning(load=0.3, cores=2) and cpu_spinning(load=1.0, cores=2)
    assert not cpu_spinning(load=1.6, cores=2) and not cpu_spinning(load=0.5, cores=1)
    monkeypatch.setenv("LLAMA2_ONNX_CPU_SPIN", "0")
    assert not cpu_spinning(load=0.0, cores=16)
    assert placed("cpu").session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("LLAMA2_ONNX_CPU_SPIN", "1")
    assert cpu_spinning(load=50.0, cores=2)
    with pytest.raises(Exception, match="allow_spinning"):  # not set: ONNX Runtime's default
        placed("cpu").session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")


def test_session_options_and_providers_follow_each_providers_rules():
    so = placed("dml").session_options()
    assert so.enable_mem_pattern is False
    assert so.execution_mode.name == "ORT_SEQUENTIAL"
    assert placed("cuda").execution_providers()[0] == (
        "CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1",
                                  "arena_extend_strategy": "kSameAsRequested"})
    assert placed("cpu").execution_providers() == ["CPUExecutionProvider"]
    original = place(config("float32"), RunOptions(provider="cuda"), ALL, contract=ORIGINAL)
    assert original.execution_providers()[0][1]["use_tf32"] == "0"  # exact float32


def test_slots_share_one_cache_where_rows_can_be_bound_by_address():
    """--parallel N: N rows in each cache buffer (counted by the memory check), graph capture
    as with one slot (a captured batched step is compared with the plain one: test_parallel.py,
    tools/slots_capture_check.py); one slot as before."""
    one, four = placed("cpu", max_seq_len=32), placed("cpu", max_seq_len=32, parallel=4)
    assert (one.slots, four.slots) == (1, 4)
    assert four.kv_cache_shape(config()) == (4, 2, 32, 16)
    assert four.kv_cache_bytes(config()) == 4 * one.kv_cache_bytes(config())
    assert placed("cuda", parallel=8).slots == 8
    assert placed("cuda").graph_capture and placed("cuda", parallel=8).graph_capture
    assert not placed("cuda", parallel=8, graph_capture=False).graph_capture
    assert placed("cpu", parallel=2, graph_capture=True).graph_capture
    assert not placed("cpu", parallel=2).graph_capture


@pytest.mark.parametrize("provider", ["dml", "webgpu"])
def test_parallel_is_refused_where_buffers_have_no_addresses(provider):
    with pytest.raises(UserError, match=f"--parallel 2 is not offered on {provider}"):
        placed(provider, parallel=2)
    assert placed(provider, parallel=1).slots == 1


def test_parallel_is_refused_for_the_original_format_and_must_be_a_count():
    with pytest.raises(UserError, match="original Llama-2-Onnx format runs one request"):
        place(config(), RunOptions(provider="cpu", parallel=2), ALL, contract=ORIGINAL)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(UserError, match="--parallel .* is invalid"):
            RunOptions(parallel=bad)


def test_a_servers_default_slots_fit_half_the_free_gpu_memory_up_to_the_measured_cap(
        monkeypatch):
    """--parallel auto (tools/serve.py's default): on CUDA as many slots as fit in half of the
    GPU memory free beside the weights, at most 16 (measured, docs/serving.md); one where the
    free memory is unknown and on every other provider."""
    seven_b = Config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, dtype="float16",
                     max_seq_len=4096)
    weights, slot = seven_b.weight_bytes(), 2 * 32 * 32 * 4096 * 128 * 2  # 2 GiB a slot
    gib = 2 ** 30
    assert auto_slots("cuda", seven_b, 4096, "float16", weights + 10 * slot) == 5
    assert auto_slots("cuda", seven_b, 4096, "float16", weights + 100 * slot) == 16
    assert auto_slots("cuda", seven_b, 1024, "float16", weights + 10 * slot) == 16
    assert auto_slots("cuda", seven_b, 4096, "float16", weights + gib) == 1
    assert auto_slots("cuda", seven_b, 4096, "float16", weights // 2) == 1
    for provider in ("cpu", "dml", "webgpu"):
        assert auto_slots(provider, seven_b, 4096, "float16", weights + 100 * slot) == 1
    monkeypatch.setattr(placement, "free_cuda_memory", lambda: None)
    assert auto_slots("cuda", seven_b, 4096, "float16") == 1
    small = config()  # 2 layers of 64: a tiny cache; 80 GiB free
    monkeypatch.setattr(placement, "free_cuda_memory", lambda: 80 * gib)
    auto = placed("cuda", parallel="auto")
    assert auto.slots == 16 and auto.graph_capture
    assert placed("cuda", parallel="auto", graph_capture=True).slots == 16
    assert placed("cpu", parallel="auto").slots == 1
    assert placed("webgpu", parallel="auto").slots == 1
    assert auto_slots("cuda", small, 64, "float16") == 16
