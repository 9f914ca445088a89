#!/usr/bin/env bash
# Device-side driver: bash bench/gpu_suite.sh STAGE... (run from the snapshot root; logs to $OUT).
#
# THE ONE LINE (issue 24): `bash bench/gpu_suite.sh realistic`, on a GPU machine with no network whose
# image has torch, transformers, peft and accelerate, with carry [".whl", ".gpu"] prepared here by
# `bash bench/gpu_wheels.sh`. It installs the wheels, makes a random 1B Llama (Llama-3.2-1B shape, vocab
# 49,152) and a BPE tokenizer from the data, and runs bench/gpu_check.py --suite realistic (every method
# and the bare loops, padded and packed, batch 16 and the auto batch, one process a row) within 450 s;
# suite.json and suite.md land in $OUT. Smoke-test the same code on CPU first:
#   python bench/gpu_check.py --suite realistic --tiny
#
# The stages below it are the older hand-run layout:
# Layout it expects (how bench/results/gpu-h100-2026-11-22.md was made): the repo snapshot at .gpu/snap
# (git archive HEAD) is the cwd; ../pkg/site.tar.xz = pip --target site of the carried wheels,
# ../pkg/tok.tar.xz = SmolLM2's tokenizer saved from the GGUF; ../fix = snapshot with
# bench/results/gpu-h100-2026-11-22/tunesmith-training-fix.diff applied; ../emb = all-MiniLM-L6-v2 (fp16 copy)
# + gsm8k questions. bench/gsm8k_sft_1500.jsonl (not in git; ../shared/data stays out of the repo):
#   python -c "import json; [print(json.dumps({'instruction': r['question'], 'output': r['answer']}))
#     for r in map(json.loads, list(open('../shared/data/gsm8k/train.jsonl'))[:1500])]" > bench/gsm8k_sft_1500.jsonl
# Stages: setup_full | setup_lite | m135 | m1b | p1 | bare135 | liger135 | p2 | liger1b | p3 | embed | dpo | grpo | pack
set -u
SNAP=$(pwd)
OUT=${OUT:-/tmp/out}
R=/tmp/w/r; mkdir -p $R
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=warning
M=/tmp/models
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
for st in "$@"; do
  stamp "stage $st"
  case $st in
    realistic) mkdir -p $OUT
        if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; fi
        PYTHONPATH=/tmp/site timeout 500 python3 bench/gpu_check.py --suite realistic --data .gpu/gsm8k_train_1500.jsonl --workdir /tmp/w/suite --out $OUT 2>&1 | grep -v -i -E "warn|^\s*$" | tail -60
        (cd /tmp/w/suite && tar -czf $OUT/logs.tgz *.log) 2>/dev/null ;;
    setup_full) [ -f /tmp/site/.full ] || { tar -xJf ../pkg/site.tar.xz -C /tmp && tar -xJf ../pkg/tok.tar.xz -C /tmp && touch /tmp/site/.full; }
                python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
                nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
                nvidia-smi -L ;;
    setup_lite) [ -d /tmp/site ] || tar -xJf ../lite/pkg-lite.tar.xz -C /tmp; [ -d /tmp/tok ] || tar -xJf ../lite/tok.tar.xz -C /tmp ;;
    m135) [ -f $M/smollm2-135m-random/model.safetensors ] || PYTHONPATH=/tmp/site python3 bench/gpu_make_models.py /tmp/tok $M smollm2-135m-random ;;
    m1b)  [ -f $M/llama-1b-random/model.safetensors ] || PYTHONPATH=/tmp/site python3 bench/gpu_make_models.py /tmp/tok $M llama-1b-random ;;
    p1) PYTHONPATH=/tmp/site timeout 330 python3 bench/gpu_check.py --base $M/smollm2-135m-random --workdir /tmp/w/p1
        cp /tmp/w/p1/gpu_check.json $R/p1_gpu_check_135m.json ;;
    bare135) for a in "" "--no-4bit"; do PYTHONPATH=/tmp/site timeout 90 python3 bench/gpu_bare_qlora.py --base $M/smollm2-135m-random $a --out $R/bare135${a}.json 2>&1 | grep -v Warning | tail -3; done ;;
    liger135) PYTHONPATH=/tmp/site timeout 150 python3 bench/gpu_check.py --base $M/smollm2-135m-random --only lora lora+packing --liger --workdir /tmp/w/liger135
        cp /tmp/w/liger135/gpu_check.json $R/liger_gpu_check_135m.json ;;
    p2) PYTHONPATH=/tmp/site timeout 330 python3 bench/gpu_check.py --base $M/llama-1b-random --workdir /tmp/w/p2
        cp /tmp/w/p2/gpu_check.json $R/p2_gpu_check_1b.json ;;
    liger1b) PYTHONPATH=/tmp/site timeout 150 python3 bench/gpu_check.py --base $M/llama-1b-random --only lora lora+packing --liger --workdir /tmp/w/liger1b
        cp /tmp/w/liger1b/gpu_check.json $R/liger_gpu_check_1b.json ;;
    p3) PYTHONPATH=/tmp/site timeout 300 python3 bench/gpu_check.py --base $M/llama-1b-random --only qlora unsloth --max-length 512 --data bench/gsm8k_sft_1500.jsonl --workdir /tmp/w/p3
        cp /tmp/w/p3/gpu_check.json $R/p3_gpu_check_1b_gsm8k.json
        PYTHONPATH=/tmp/site timeout 120 python3 bench/gpu_bare_qlora.py --base $M/llama-1b-random --max-length 512 --data bench/gsm8k_sft_1500.jsonl --out $R/p3_bare_qlora_1b_gsm8k.json 2>&1 | grep -v Warning | tail -3 ;;
    embed) timeout 240 python3 bench/gpu_embed.py ../emb/minilm ../emb/gsm8k_questions.jsonl.gz --rows 100000 --fp16 --topk --out $R/embed_gpu.json ;;
    dpo) PYTHONPATH=/tmp/site timeout 150 python3 bench/gpu_trl.py dpo --base $M/smollm2-135m-random --out $R/trl_dpo.json 2>&1 | grep -v -i warn | tail -8 ;;
    grpo) PYTHONPATH=/tmp/site timeout 200 python3 bench/gpu_trl.py grpo --base $M/smollm2-135m-random --steps 10 --out $R/trl_grpo.json 2>&1 | grep -v -i warn | tail -8 ;;
    fix135) (cd ../fix && PYTHONPATH=/tmp/site timeout 150 python3 bench/gpu_check.py --base $M/smollm2-135m-random --only unsloth --workdir /tmp/w/fix135)
        cp /tmp/w/fix135/gpu_check.json $R/fix_unsloth_135m.json ;;
    pad) for d in snap fix; do (cd ../$d && PYTHONPATH=/tmp/site timeout 120 python3 bench/gpu_check.py --base $M/smollm2-135m-random --only unsloth --steps 10 --pad-token '<|pad|>' --workdir /tmp/w/pad_$d)
        cp /tmp/w/pad_$d/gpu_check.json $R/pad_unsloth_$d.json; grep -a -i -E "error|assert" /tmp/w/pad_$d/unsloth.log | head -5; done ;;
    u3) PYTHONPATH=/tmp/site timeout 150 python3 bench/gpu_check.py --base $M/llama-1b-random --only unsloth --max-length 512 --data bench/gsm8k_sft_1500.jsonl --workdir /tmp/w/u3 ;;
    u1) PYTHONPATH=/tmp/site timeout 120 python3 bench/gpu_check.py --base $M/smollm2-135m-random --only unsloth --workdir /tmp/w/u1 ;;
    ufix) (cd ../fix && PYTHONPATH=/tmp/site timeout 120 python3 bench/gpu_check.py --base $M/smollm2-135m-random --only unsloth --workdir /tmp/w/ufix) ;;
    pack) (cd /tmp/w && find . -name '*.json' -size -2M -path '*r/*' -o -name '*.log' -o -name 'metrics.json' -o -name 'step_timing.json' -o -name 'gpu_check.json' | tar -czf $OUT/results.tgz -T - 2>/dev/null); ls -la $OUT ;;
  esac
done
stamp done
