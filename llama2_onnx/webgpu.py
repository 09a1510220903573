"""WebGPU through ONNX Runtime's plugin execution provider (the onnxruntime-ep-webgpu wheel):
registering the plugin, finding its device, probing the adapter, and the session options.

The plugin runs on Direct3D 12 (Windows), Vulkan (Linux) and Metal (macOS). It is a shared
library that ONNX Runtime loads at run time (`register_execution_provider_library`), after which
it lists one device (`get_ep_devices`); a session selects it with `add_provider_for_devices`
and is created without a `providers=` list. The device lists no adapter features, so whether
the adapter computes in float16 (WebGPU's `shader-f16`) is found by running one float16
multiply: adapters without it (older integrated GPUs, software ones) run float16 and int4
variants with float32 activations (graph_forms).

Nothing here selects a software adapter: `ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1` and a Vulkan
ICD such as SwiftShader's are set by the tests only.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys

import numpy as np
import onnxruntime as ort

from .errors import UserError

EP_NAME = "WebGpuExecutionProvider"
INSTALL = 'pip install -e ".[webgpu]"` (or `pip install onnxruntime-ep-webgpu`'
MIN_ONNXRUNTIME = (1, 24, 4)
VULKAN_LOADER = "libvulkan.so.1"
NO_ADAPTER = ("WebGPU found no usable GPU adapter; install or update the GPU's driver (on "
              "Linux its Vulkan driver), or choose --provider cpu.")
# ONNX Runtime's message when the plugin offers a device but Dawn then finds no adapter.
_NO_ADAPTER_MESSAGE = "Failed to get a WebGPU adapter"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


@functools.cache
def device() -> ort.OrtEpDevice:
    """The plugin's device, registering the plugin library with ONNX Runtime the first time.

    Raises:
        UserError naming the fix when the plugin, the Vulkan loader (Linux) or an adapter is
        missing, or this onnxruntime is too old for the plugin.
    """
    found = _devices()
    if not found:  # not registered yet (by us or by another library in this process)
        _check_vulkan_loader()
        library = _plugin_library()
        if version_tuple(ort.__version__) < MIN_ONNXRUNTIME:
            raise UserError(f"--provider webgpu needs onnxruntime >= "
                            f"{'.'.join(map(str, MIN_ONNXRUNTIME))}, not {ort.__version__}; run "
                            "`pip install --upgrade onnxruntime`.")
        if _registered:  # registered earlier without a device: adapters are found anew
            ort.unregister_execution_provider_library(EP_NAME)
            _registered.clear()
        ort.register_execution_provider_library(EP_NAME, library)
        _registered.append(library)  # a second registration under the same name fails
        found = _devices()
    if not found:
        raise UserError(NO_ADAPTER)
    return found[0]  # the plugin lists one device and picks the physical adapter itself


_registered: list[str] = []


def available() -> bool:
    """Whether WebGPU can be offered (`--provider auto`): the plugin is installed, the Vulkan
    loader is there (Linux), and the plugin offers a device. Never raises."""
    if importlib.util.find_spec("onnxruntime_ep_webgpu") is None:
        return False
    try:
        device()
    except UserError:
        return False
    return True


def _devices() -> list[ort.OrtEpDevice]:
    return [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]


def _plugin_library() -> str:
    try:
        import onnxruntime_ep_webgpu as plugin
    except ImportError:
        raise UserError(f"--provider webgpu needs the package onnxruntime-ep-webgpu; run "
                        f"`{INSTALL}`.") from None
    return plugin.get_library_path()


def _check_vulkan_loader() -> None:
    """On Linux the plugin reaches the GPU through the system's Vulkan loader; without it the
    plugin still lists a device and only fails, as "no adapter", when a session opens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(VULKAN_LOADER)
    except OSError as exc:
        raise UserError(f"--provider webgpu on Linux needs the Vulkan loader {VULKAN_LOADER} "
                        f"({exc}); install it with `sudo apt install libvulkan1` (Fedora: "
                        "vulkan-loader).") from None


def add_to(so: ort.SessionOptions, graph_capture: bool = False) -> None:
    """Select the WebGPU device in `so`; with `graph_capture` the EP records a decode step once
    and replays it (run option `gpu_graph_id`, as on CUDA).

    Raises:
        UserError as device() does.
    """
    so.add_provider_for_devices([device()], {"enableGraphCapture": "1" if graph_capture else "0"})


def check_session_error(exc: BaseException) -> None:
    """Raise the no-adapter UserError when `exc` (from creating a session) is the plugin's
    "no adapter" failure; a missing Vulkan driver or loader ends there too."""
    if _NO_ADAPTER_MESSAGE in str(exc):
        raise UserError(NO_ADAPTER) from None


@functools.cache
def has_shader_f16() -> bool:
    """Whether the adapter computes in float16 (WebGPU's `shader-f16`), found by running one
    float16 multiply (a few milliseconds).

    Raises:
        UserError as device() does, and when no adapter answers.
    """
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [4]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "probe",
                              values[:1], values[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the expected failure on an adapter without float16 is not news
    add_to(so)
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=so)
    except Exception as exc:  # ORT raises EPFail, Fail...
        check_session_error(exc)
        raise
    try:
        out = session.run(None, {"x": np.arange(4, dtype=np.float16)})[0]
    except Exception as exc:  # "Program Mul requires f16 but the device does not support it"
        if "f16" in str(exc):
            return False
        raise
    return bool(np.array_equal(out, np.arange(4, dtype=np.float16) ** 2))
