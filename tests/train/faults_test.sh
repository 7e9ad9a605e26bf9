#!/usr/bin/env bash
# Faults a real 2-rank gbmoe-train job meets, one case per call:
#   rank_sigterm    SIGTERM to every rank: checkpoint, exit 0, resume
#   mpirun_sigterm  SIGTERM to mpirun: one checkpoint of the step it stopped at, every rank exits
#                   0 (mpirun itself reports the job it was asked to kill as failed), exact resume
#   mpirun_sigterm_long_step  SIGTERM to mpirun in a step longer than mpirun's kill window: the
#                   checkpoint of the last completed step, written during the step, resumes
#                   exactly as an uninterrupted run goes on
#   mpirun_sigusr1  SIGUSR1 to mpirun (forwarded at once, no kill): checkpoint, mpirun exits 0
#   disk_full       a run directory on a small tmpfs fills up during a checkpoint: the error names
#                   the path and "no space left on device", no partial files stay, and the
#                   previous checkpoint resumes (skipped with a message where mounting is denied)
#   stuck_rank      one rank is stopped (SIGSTOP): the others abort the job after
#                   train.collective_timeout_s, naming the collective
#   kill9           kill -9 of the job at random moments: every restart resumes
# Usage: faults_test.sh <case> <gbmoe-train> <gbmoe-data> <mpiexec> <source dir> <work dir>
set -euo pipefail
case=$1 train=$2 data=$3 mpiexec=$4 src=$5 work=$6
rm -rf "$work" && mkdir -p "$work"
mnt="$work/mnt"
cleanup() {
  [ -n "${job:-}" ] && kill -CONT $(pgrep -P "$job" 2>/dev/null) 2>/dev/null || true
  mountpoint -q "$mnt" 2>/dev/null && umount "$mnt" || true
}
trap cleanup EXIT
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

base=(--config "$src/configs/tiny.yaml" --set "data.dir=$work/corpus" --set train.log_every=1
      --set train.eval_every=0)
steps_in() {
  if [ -f "$1/metrics.jsonl" ]; then grep -c '"maxvio_global"' "$1/metrics.jsonl" || true; else echo 0; fi
}
wait_steps() {  # <run dir> <n>: up to 60 s for n steps of the job
  for _ in $(seq 600); do
    [ "$(steps_in "$1")" -ge "$2" ] && return 0
    kill -0 "$job" 2>/dev/null || fail "the job ended early"
    sleep 0.1
  done
  fail "no $2 steps within 60 s"
}

# After a stop at step $1 of the run in $work/run (options in run=()): its checkpoint is complete,
# metrics.jsonl holds each step once, and a resumed run goes on from it for 2 more steps.
resumes_from_stop() {
  local step=$1 ckpt
  ckpt=$(printf "%s/run/checkpoints/step_%08d" "$work" "$step")
  [ -f "$ckpt/manifest.txt" ] || fail "no complete checkpoint $ckpt"
  [ "$(steps_in "$work/run")" = "$step" ] || fail "metrics lines != $step"
  "$mpiexec" -np 2 "$train" "${base[@]}" "${run[@]}" --set train.resume=auto \
    --set train.steps=$((step + 2)) > "$work/resume.log" 2>&1 || fail "resume exited non-zero"
  grep -q "resumed from .*step_$(printf %08d "$step") at step $step" "$work/resume.log" \
    || fail "resume did not start from step $step"
  [ "$(steps_in "$work/run")" = $((step + 2)) ] || fail "resumed run did not append 2 steps"
}

# Signal $1 to $2 (the ranks, or mpirun) after 3 steps: the job exits 0 with "stopped after step
# N" and resumes from N (sets step).
stop_and_resume() {
  local sig=$1 target=$2 ranks rc=0
  run=(--set "train.run_dir=$work/run" --set train.checkpoint_every=0)
  "$mpiexec" -np 2 "$train" "${base[@]}" "${run[@]}" --set train.steps=1000000 \
    > "$work/first.log" 2>&1 &
  job=$!
  wait_steps "$work/run" 3
  if [ "$target" = ranks ]; then
    ranks=$(pgrep -P $job gbmoe-train || true)
    [ "$(echo $ranks | wc -w)" = 2 ] || fail "expected 2 rank processes under mpirun, got: $ranks"
    kill -$sig $ranks
  else
    kill -$sig $job
  fi
  wait $job || rc=$?
  job=
  [ $rc = 0 ] || fail "job exited $rc after SIG$sig to $target (expected 0)"
  step=$(sed -n 's/.*stopped after step \([0-9]*\);.*/\1/p' "$work/first.log")
  [ -n "$step" ] || fail "no 'stopped after step' line"
  resumes_from_stop "$step"
}

case $case in
rank_sigterm)
  # SIGTERM to every rank, as a scheduler sends it to every task.
  stop_and_resume TERM ranks
  echo "PASS: stopped cleanly after step $step and resumed"
  ;;
mpirun_sigterm)
  run=(--set "train.run_dir=$work/run" --set train.checkpoint_every=0)
  # Open MPI 4.1 passes SIGTERM on to the ranks odls_base_sigkill_timeout seconds after mpirun
  # gets it and SIGKILLs them as long again later: the window to checkpoint in.
  "$mpiexec" --mca odls_base_sigkill_timeout 3 -np 2 "$train" "${base[@]}" "${run[@]}" \
    --set train.steps=1000000 > "$work/first.log" 2>&1 &
  job=$!
  wait_steps "$work/run" 3
  start=$(date +%s)
  kill -TERM $job
  rc=0; wait $job || rc=$?
  job=
  echo "mpirun exited $rc after $(( $(date +%s) - start )) s"
  grep -q "error\|Killed\|killed" "$work/first.log" && fail "a rank failed or was killed"
  # mpirun stops forwarding the ranks' output once it is terminating the job, so their last
  # lines ("stopped after step N") may be lost: the checkpoint itself is the evidence.
  ckpt=$(ls -d "$work"/run/checkpoints/step_* 2>/dev/null | tail -1)
  [ -n "$ckpt" ] || fail "no checkpoint after SIGTERM to mpirun"
  step=$((10#$(basename "$ckpt" | sed 's/step_//')))
  resumes_from_stop "$step"
  echo "PASS: checkpoint at step $step after SIGTERM to mpirun, resumed"
  ;;
mpirun_sigterm_long_step)
  # mpirun passes SIGTERM on after 1 s and SIGKILLs 1 s later: a step of at least 3 s (64
  # micro-batches on a loaded 2-core machine, more on a faster one) on 2 expert-parallel ranks
  # (rank 0 joins rank 1's expert shards from a file) is killed in the middle.
  accum=64
  while :; do
    slow=(--set data.grad_accum=$accum --set parallel.expert_parallel=2
          --set train.checkpoint_every=0)
    run=(--set "train.run_dir=$work/run" "${slow[@]}")
    "$mpiexec" --mca odls_base_sigkill_timeout 1 -np 2 "$train" "${base[@]}" "${run[@]}" \
      --set train.steps=1000000 > "$work/first.log" 2>&1 &
    job=$!
    wait_steps "$work/run" 1
    # Step 1's seconds: its tokens (2 ranks x accum x 2 x 32) over its tokens_per_s.
    ms=$(sed -n 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/p' "$work/run/metrics.jsonl" \
      | awk -v t=$((accum * 128)) '{ printf "%d", 1000 * t / $1 }')
    [ "$ms" -ge 3000 ] && break
    kill -9 $(pgrep -P $job gbmoe-train) $job 2>/dev/null || true
    wait $job 2>/dev/null || true
    rm -rf "$work/run"
    accum=$((accum * 4000 / (ms + 1) + 1))
    echo "step 1 took $ms ms: again with $accum micro-batches"
  done
  kill -TERM $job  # early in step 2; step 1 was not checkpointed (checkpoint_every 0)
  rc=0; wait $job || rc=$?
  job=
  [ "$(steps_in "$work/run")" = 1 ] || fail "step 2 ended within the kill window: make it longer"
  resumes_from_stop 1  # the checkpoint of step 1, written while step 2 ran; 2 more steps
  "$mpiexec" -np 2 "$train" "${base[@]}" --set "train.run_dir=$work/ref" "${slow[@]}" \
    --set train.steps=3 > "$work/ref.log" 2>&1 || fail "the uninterrupted run exited non-zero"
  untimed() { sed 's/"tokens_per_s":[^,]*,//' "$1/metrics.jsonl"; }
  diff <(untimed "$work/run") <(untimed "$work/ref") > "$work/diff.log" \
    || fail "the resumed run differs from the uninterrupted one: $(head -c 600 "$work/diff.log")"
  echo "PASS: killed in step 2 (mpirun exited $rc), the checkpoint of step 1 resumed exactly"
  ;;
mpirun_sigusr1)
  # mpirun forwards SIGUSR1 at once and kills nothing: the job ends as the ranks do.
  stop_and_resume USR1 mpirun
  echo "PASS: SIGUSR1 to mpirun: exit 0, checkpoint at step $step, resumed"
  ;;
disk_full)
  # The size of one checkpoint, from a run on the ordinary disk.
  "$mpiexec" -np 2 "$train" "${base[@]}" --set "train.run_dir=$work/probe" --set train.steps=1 \
    --set train.checkpoint_every=1 > "$work/probe.log" 2>&1 || fail "probe run"
  size=$(du -sk "$work/probe/checkpoints/step_00000001" | cut -f1)
  mkdir -p "$mnt"
  # Room for one checkpoint and a half: the second one (the first is kept until it is
  # complete) fills the disk.
  if ! mount -t tmpfs -o size=$((size * 3 / 2 + 64))k tmpfs "$mnt" 2>"$work/mount.log"; then
    echo "SKIP: cannot mount a tmpfs here ($(cat "$work/mount.log")); PASS: skipped"
    exit 0
  fi
  run=(--set "train.run_dir=$mnt/run" --set train.checkpoint_every=2 --set train.keep_checkpoints=1)
  rc=0
  "$mpiexec" -np 2 "$train" "${base[@]}" "${run[@]}" --set train.steps=6 > "$work/full.log" 2>&1 \
    || rc=$?
  [ $rc != 0 ] || fail "the run on a full disk exited 0"
  grep -q "cannot write the checkpoint of step 4 ($mnt/run/checkpoints/step_00000004): .*no space left on device; its partial files were removed; the previous checkpoint $mnt/run/checkpoints/step_00000002 is kept" "$work/full.log" \
    || fail "no 'no space left on device' message naming the path"
  [ "$(grep -c '^error: ' "$work/full.log")" = 1 ] || fail "expected the error once"
  left=$(ls "$mnt/run/checkpoints")
  [ "$left" = "$(printf 'latest\nstep_00000002')" ] || fail "checkpoints left: $left"
  cp -a "$mnt/run" "$work/run"
  umount "$mnt"
  "$mpiexec" -np 2 "$train" "${base[@]}" --set "train.run_dir=$work/run" --set train.steps=6 \
    --set train.resume=auto > "$work/resume.log" 2>&1 || fail "resume exited non-zero"
  grep -q "resumed from .*step_00000002 at step 2" "$work/resume.log" || fail "resume not at 2"
  echo "PASS: full disk reported with the path, previous checkpoint resumed"
  ;;
stuck_rank)
  "$mpiexec" -np 2 "$train" "${base[@]}" --set "train.run_dir=$work/run" \
    --set train.checkpoint_every=0 --set train.collective_timeout_s=3 \
    --set train.steps=1000000 > "$work/stuck.log" 2>&1 &
  job=$!
  wait_steps "$work/run" 3
  ranks=$(pgrep -P $job gbmoe-train || true)
  [ "$(echo $ranks | wc -w)" = 2 ] || fail "expected 2 rank processes under mpirun, got: $ranks"
  kill -STOP $(echo $ranks | cut -d' ' -f2)
  start=$(date +%s)
  for _ in $(seq 300); do kill -0 $job 2>/dev/null || break; sleep 0.1; done
  kill -0 $job 2>/dev/null && fail "the job still waits 30 s after a rank was stopped"
  rc=0; wait $job || rc=$?
  job=
  [ $rc != 0 ] || fail "the job exited 0"
  # Which ranks are named as behind depends on where the stopped rank was caught (both ranks can
  # be inside the collective already); the rank, the collective and the limit are always named.
  # The collective: an MPI call, or one through node shared memory ("a node-shared ...").
  grep -Eq "\[rank [01]\] error: (MPI_[A-Za-z_ ()-]*|a node-shared [a-z ();'-]*) \(collective [0-9]* of this rank.*\) has waited [0-9.]* s, more than the limit of 3 s \(train.collective_timeout_s\): another rank is stopped, stuck or dead" "$work/stuck.log" \
    || fail "no message naming the collective and the limit"
  echo "PASS: stuck rank ended the job after $(( $(date +%s) - start )) s"
  ;;
kill9)
  # kill -9 of the whole job at random moments (while training, checkpointing, starting): every
  # restart with resume=auto goes on from a checkpoint that verifies, and the finished run's
  # metrics hold each step once.
  run=(--set "train.run_dir=$work/run" --set train.checkpoint_every=1 --set train.keep_checkpoints=2
       --set train.resume=auto --set train.steps=60)
  RANDOM=11
  for trial in $(seq 20); do
    "$mpiexec" -np 2 "$train" "${base[@]}" "${run[@]}" >> "$work/kill9.log" 2>&1 &
    job=$!
    sleep "$((1 + RANDOM % 3)).$((RANDOM % 10))"  # start-up takes about 1.5 s
    kill -9 $(pgrep -P $job gbmoe-train) $job 2>/dev/null || true
    wait $job 2>/dev/null || true
    job=
    grep -q "no checkpoint in .* can be resumed from\|error:" "$work/kill9.log" \
      && fail "trial $trial: a restart failed"
  done
  resumed=$(grep -c "^resumed from " "$work/kill9.log" || true)
  [ "$resumed" -ge 6 ] || fail "only $resumed of the restarts found a checkpoint to resume"
  "$mpiexec" -np 2 "$train" "${base[@]}" "${run[@]}" > "$work/final.log" 2>&1 \
    || fail "the last resume exited non-zero"
  steps=$(grep -o '^{"step":[0-9]*,"loss"' "$work/run/metrics.jsonl" | sort | uniq -d | head -1)
  [ -z "$steps" ] || fail "a step appears twice in metrics.jsonl: $steps"
  [ "$(steps_in "$work/run")" = 60 ] || fail "metrics hold $(steps_in "$work/run") steps, not 60"
  echo "PASS: 20 kill -9 trials ($resumed restarts resumed), 60 steps once each"
  ;;
*) fail "unknown case $case" ;;
esac
