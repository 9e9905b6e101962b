#!/usr/bin/env bash
# Parallel `sparseattn eval` on one GPU (one device call): one process per method group, each
# writing its own results folder OUT/eval/partN (resumed from resume/partN when that exists).
# The model is small and the evaluation loop is Python-bound, so several processes share the GPU.
#   MODEL=~/smol/model.gguf HAY=.carry2/pg_essays bash scripts/gpu_eval.sh "--methods dense,xattention" ...
set -o pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
COMMON="--model $MODEL --tasks ${TASKS:-niah,variable_tracking,common_words,frequent_words} --lengths ${LENGTHS:-2k,4k,8k}
  --depths ${DEPTHS:-0,0.5,1} --samples ${SAMPLES:-2} --haystack $HAY --no-progress --threads 2"
i=0
for group in "$@"; do
  mkdir -p "$OUT/eval/part$i"
  if [ -d "resume/part$i" ]; then cp resume/part$i/results.jsonl resume/part$i/run.json "$OUT/eval/part$i/" 2>/dev/null; fi
  echo "part$i: $group" | tee -a "$OUT/eval/parts.txt"
  (timeout "${LIMIT:-540}" python -m sparseattn.cli eval $COMMON $group --out "$OUT/eval/part$i" \
     > "$OUT/eval/part$i.log" 2>&1; echo "part$i exit $?" >> "$OUT/eval/parts.txt") &
  i=$((i + 1))
done
wait
cat "$OUT/eval/parts.txt"
for f in "$OUT"/eval/part*/results.jsonl; do echo "$f $(wc -l < "$f")"; done
