#!/usr/bin/env bash
# SIGTERM to a running `mpirun -np 2 gbmoe-train` job (as a scheduler sends it to every task)
# writes a checkpoint, exits 0, and the run resumes from that checkpoint.
# Usage: sigterm_test.sh <gbmoe-train> <gbmoe-data> <mpiexec> <source dir> <work dir>
set -euo pipefail
train=$1 data=$2 mpiexec=$3 src=$4 work=$5
rm -rf "$work" && mkdir -p "$work"
fail() { echo "FAIL: $*"; sed 's/^/  log: /' "$work"/*.log 2>/dev/null | tail -40; exit 1; }

# A tiny two-domain corpus (numbers vary, so the tokenizer finds enough pieces).
RANDOM=7
for d in animals numbers; do
  mkdir -p "$work/raw/$d"
  for i in 0 1 2 3; do
    for s in $(seq 60); do
      if [ $d = animals ]; then echo "the cat $RANDOM and dog $RANDOM saw an owl near horse $i."
      else echo "one two $RANDOM three seven $RANDOM ninety zero $s $i."; fi
    done > "$work/raw/$d/doc$i.txt"
  done
done
"$data" --input "$work/raw" --output "$work/corpus" --vocab-size 320 --val-fraction 0.25 \
  --threads 1 --quiet > "$work/data.log" 2>&1 || fail "gbmoe-data"

run=(--config "$src/configs/tiny.yaml" --set "data.dir=$work/corpus" --set "train.run_dir=$work/run"
     --set train.log_every=1 --set train.eval_every=0 --set train.checkpoint_every=0)
"$mpiexec" -np 2 "$train" "${run[@]}" --set train.steps=1000000 > "$work/first.log" 2>&1 &
job=$!
for _ in $(seq 600); do  # up to 60 s for 3 steps
  [ "$(wc -l < "$work/run/metrics.jsonl" 2>/dev/null || echo 0)" -ge 3 ] && break
  kill -0 $job 2>/dev/null || fail "the job ended before SIGTERM"
  sleep 0.1
done
ranks=$(pgrep -P $job gbmoe-train || true)
[ "$(echo $ranks | wc -w)" = 2 ] || fail "expected 2 rank processes under mpirun, got: $ranks"
kill -TERM $ranks
rc=0; wait $job || rc=$?
[ $rc = 0 ] || fail "job exited $rc after SIGTERM (expected 0)"
step=$(sed -n 's/.*stopped after step \([0-9]*\);.*/\1/p' "$work/first.log")
[ -n "$step" ] || fail "no 'stopped after step' line"
ckpt=$(printf "%s/run/checkpoints/step_%08d" "$work" "$step")
[ -f "$ckpt/state.pt" ] && [ -f "$ckpt/meta.txt" ] || fail "no complete checkpoint $ckpt"
[ "$(grep -c '"maxvio_global"' "$work/run/metrics.jsonl")" = "$step" ] || fail "metrics lines != $step"

"$mpiexec" -np 2 "$train" "${run[@]}" --set train.resume=auto --set train.steps=$((step + 2)) \
  > "$work/resume.log" 2>&1 || fail "resume exited non-zero"
grep -q "resumed from .*step_$(printf %08d "$step") at step $step" "$work/resume.log" \
  || fail "resume did not start from step $step"
[ "$(grep -c '"maxvio_global"' "$work/run/metrics.jsonl")" = $((step + 2)) ] \
  || fail "resumed run did not append 2 steps"
echo "PASS: stopped cleanly after step $step and resumed"
