#!/usr/bin/env bash
# Parallel `sparseattn eval` on one GPU (one device call): one process per method group, each
# writing its own results folder EVAL_DIR/partN (default ~/eval: outside $OUT, so a call that ends
# early or a later call can resume; resumed from resume/partN when that exists). Everything is
# packed into one archive $OUT/eval.tgz at the end (a device call returns few files).
# The model is small and the evaluation loop is Python-bound, so several processes share the GPU.
#   MODEL=~/smol/model.gguf HAY=.carry2/pg_essays bash scripts/gpu_eval.sh "--methods dense,xattention" ...
set -o pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
EVAL_DIR=${EVAL_DIR:-$HOME/eval}
COMMON="--model $MODEL --tasks ${TASKS:-niah,variable_tracking,common_words,frequent_words} --lengths ${LENGTHS:-2k,4k,8k}
  --depths ${DEPTHS:-0,0.5,1} --samples ${SAMPLES:-2} --haystack $HAY --no-progress --threads 2"
i=0
for group in "$@"; do
  mkdir -p "$EVAL_DIR/part$i"
  if [ -d "resume/part$i" ]; then cp resume/part$i/results.jsonl resume/part$i/run.json "$EVAL_DIR/part$i/" 2>/dev/null; fi
  echo "part$i: $group" | tee -a "$EVAL_DIR/parts.txt"
  (timeout "${LIMIT:-540}" python -m sparseattn.cli eval $COMMON $group --out "$EVAL_DIR/part$i" \
     > "$EVAL_DIR/part$i.log" 2>&1; echo "part$i exit $?" >> "$EVAL_DIR/parts.txt") &
  i=$((i + 1))
done
wait
cat "$EVAL_DIR/parts.txt"
for f in "$EVAL_DIR"/part*/results.jsonl; do echo "$f $(wc -l < "$f")"; done
tar czf "$OUT/eval.tgz" -C "$EVAL_DIR" . && ls -la "$OUT/eval.tgz"
