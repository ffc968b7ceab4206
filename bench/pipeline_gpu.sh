#!/usr/bin/env bash
# The recipe on one GPU, end to end, and its record: SIZE's base (`make base SIZE=...` when configs/SIZE/base is
# missing), then configs/SIZE/pipeline.yaml (five stages, resumable: a re-run skips finished stages and resumes the
# interrupted one), then the report, manifest, log and GRPO step split copied to bench/results/pipeline_SIZE_gpu/.
#   bash bench/pipeline_gpu.sh 7m            (GPU machine with the `gpu` extra; PY=python3 where there is no .venv)
set -euo pipefail
SIZE=${1:-7m}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run=runs/$SIZE; out=bench/results/pipeline_${SIZE}_gpu
mkdir -p "$run" "$out"
if [ ! -f "configs/$SIZE/base/model.safetensors" ]; then
  start=$(date +%s)
  make base SIZE="$SIZE" BASE_PY="$PY" 2>&1 | tee "$run/base.log"
  echo "base: $(( $(date +%s) - start )) s" | tee -a "$run/base.log"
fi
start=$(date +%s)
# a resumed run appends to the log: the whole record stays in one file
$PY -m pipelines pipeline --config "configs/$SIZE/pipeline.yaml" 2>&1 | tee -a "$run/pipeline.log"
echo "pipeline: $(( $(date +%s) - start )) s this run" | tee -a "$run/pipeline.log"
cp "$run/report.md" "$run/manifest.json" "$out/"
[ -f "$run/report.png" ] && cp "$run/report.png" "$out/"
# the log with each progress bar's last state only (tqdm redraws with carriage returns), so it reads as text
tr '\r' '\n' < "$run/pipeline.log" | awk '!/\| *[0-9]+\/[0-9]+ \[/ || /100%/' > "$out/pipeline.log"
$PY - "$run" "$out" <<'PY'
import json, sys
run, out = sys.argv[1:]
split = json.load(open(f"{run}/grpo/metrics.json")).get("train", {}).get("step_time")
json.dump({"grpo_step_time": split}, open(f"{out}/grpo_step_time.json", "w"), indent=1)
print("grpo step time:", json.dumps(split))
PY
