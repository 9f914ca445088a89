#!/usr/bin/env bash
# Prepare, on this machine, what bench/gpu_suite.sh realistic needs on a GPU machine with no network
# whose image has torch, transformers, peft, accelerate, pandas, pyarrow, pyyaml, matplotlib (Python 3.12):
#   .whl/  the other packages as wheels (about 47 MB; unsloth and its dependencies do not fit the 64 MiB
#          a device call carries, so its row is skipped unless the image has it)
#   .gpu/gsm8k_train_1500.jsonl  the first 1,500 GSM8K train rows (from ../shared/data; never committed)
# Both folders are ignored through .git/info/exclude. Then, on the device: `bash bench/gpu_suite.sh realistic`
# with carry [".whl", ".gpu"].
set -eu
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"; done
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl trl==1.15.0 datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18 jsonschema==4.25.1 \
  jsonschema-specifications==2025.9.1 referencing==0.36.2 rpds-py==0.27.1 liger-kernel==0.8.5 bitsandbytes==0.50.2
mkdir -p .gpu
DATA=${GSM8K:-$(git rev-parse --show-toplevel)/../shared/data/gsm8k/train.jsonl}
head -n 1500 "$DATA" > .gpu/gsm8k_train_1500.jsonl
du -sh .whl .gpu
