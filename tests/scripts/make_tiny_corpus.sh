#!/usr/bin/env bash
# A tiny 3-domain corpus (animals, numbers, code; 5 documents of 60 lines each) tokenized by
# gbmoe-data into WORK_DIR/corpus, for the report script tests. WORK_DIR is emptied first.
# Usage: make_tiny_corpus.sh BUILD_DIR WORK_DIR
set -euo pipefail
build=$1 work=$2
rm -rf "$work"
for spec in "animals:cat dog horse lion mouse owl" "numbers:one two three seven ninety zero" \
            "code:int x = { } return ( )"; do
  domain=${spec%%:*} words=(${spec#*:})
  mkdir -p "$work/raw/$domain"
  for doc in 0 1 2 3 4; do
    for line in $(seq 60); do
      for w in 1 2 3 4 5 6 7 8; do
        printf '%s ' "${words[$(((doc * 7 + line * 5 + w * w) % ${#words[@]}))]}"
      done
      echo
    done > "$work/raw/$domain/doc$doc.txt"
  done
done
"$build/train/gbmoe-data" --input "$work/raw" --output "$work/corpus" --vocab-size 400 \
  --val-fraction 0.2 --threads 1 > /dev/null
