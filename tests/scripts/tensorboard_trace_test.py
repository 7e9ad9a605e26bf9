#!/usr/bin/env python3
"""End to end on one tiny gbmoe-train run (1 rank, generated 3-domain corpus):
- TensorBoard's own event reader finds every number of metrics.jsonl with its step and value;
- a record whose CRC is corrupted is rejected by that reader (DataLossError; the loader stops);
- the routing trace read by scripts/read_routing_trace.py gives the frequencies gbmoe-analyze
  --trace writes, and the per-layer counts of expert_loads.jsonl on the traced steps.
Usage: tensorboard_trace_test.py BUILD_DIR WORK_DIR"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import read_routing_trace  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402
from tensorboard.compat import tf  # noqa: E402

build, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
words = {"animals": "cat dog horse lion mouse owl", "numbers": "one two three seven ninety zero",
         "code": "int x = { } return ( )"}
for domain, text in words.items():
    w = text.split()
    os.makedirs(f"{work}/raw/{domain}")
    for doc in range(5):
        with open(f"{work}/raw/{domain}/doc{doc}.txt", "w") as f:
            for line in range(60):
                f.write(" ".join(w[(doc * 7 + line * 5 + i * i) % len(w)] for i in range(8)) + "\n")
subprocess.run([f"{build}/train/gbmoe-data", "--input", f"{work}/raw", "--output",
                f"{work}/corpus", "--vocab-size", "400", "--val-fraction", "0.2", "--threads", "1"],
               check=True, stdout=subprocess.DEVNULL)
run = f"{work}/run"
subprocess.run([f"{build}/train/gbmoe-train", "--config", f"{ROOT}/configs/tiny.yaml",
                "--set", f"data.dir={work}/corpus", "--set", f"train.run_dir={run}",
                "--set", "train.routing_trace_every=2", "--set", "train.expert_loads=true",
                "--set", "train.log_every=100"], check=True, stdout=subprocess.DEVNULL)


def flatten(obj, path=""):
    """metrics.jsonl numbers as the tags gbmoe writes: keys joined by '/', list items layerN."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not (path == "" and k == "step"):
                yield from flatten(v, f"{path}/{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{path}/layer{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, float(obj)


# 1. Every scalar of metrics.jsonl, with its step and value, through EventAccumulator.
expected = {}
for line in open(f"{run}/metrics.jsonl"):
    record = json.loads(line)
    for tag, value in flatten(record):
        expected.setdefault(tag, {})[record["step"]] = value
for tag in ("loss", "lr", "load_cv/layer1", "dead_experts/layer0", "routing_entropy/layer0",
            "topk_score_sum/layer1", "across_layers/maxvio_global/median", "eval/val_loss",
            "eval/mutual_information/layer0"):
    assert tag in expected, f"metrics.jsonl lacks {tag}: {sorted(expected)}"
# Softmax over E = 4 experts, top-2: the entropy lies in (0, ln 4], the top-2 score sum in
# [1/2, 1]; the metrics are per layer, every step.
steps = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
steps = [r for r in steps if "eval" not in r]
assert len(steps) == 6
for r in steps:
    for h, s in zip(r["routing_entropy"], r["topk_score_sum"]):
        assert 0 < h <= math.log(4) + 1e-6 and 0.5 <= s <= 1.0, r
    assert r["across_layers"]["routing_entropy"]["max"] == max(r["routing_entropy"]), r
events = glob.glob(f"{run}/tb/events.out.tfevents.*")
assert len(events) == 1, events
acc = event_accumulator.EventAccumulator(f"{run}/tb", size_guidance={"scalars": 0})
acc.Reload()
tags = set(acc.Tags()["scalars"])
assert tags == set(expected), f"tags differ: {sorted(tags ^ set(expected))}"
n = 0
for tag, by_step in expected.items():
    got = {e.step: e.value for e in acc.Scalars(tag)}
    assert set(got) == set(by_step), f"{tag}: steps {sorted(got)} != {sorted(by_step)}"
    for step, value in by_step.items():
        assert abs(got[step] - value) <= 1e-6 * max(1.0, abs(value)), (tag, step, got[step], value)
        n += 1
print(f"tensorboard: {len(expected)} tags, {n} scalars match metrics.jsonl")

# 2. A corrupted CRC: TensorBoard's record reader raises DataLossError; its loader stops there.
data = bytearray(open(events[0], "rb").read())
offsets, pos = [], 0
while pos < len(data):
    length = int.from_bytes(data[pos:pos + 8], "little")
    offsets.append((pos, length))
    pos += 12 + length + 4
assert pos == len(data) and len(offsets) > 3
bad = f"{work}/bad/events.out.tfevents.0.bad"
os.makedirs(os.path.dirname(bad))
start, length = offsets[2]
data[start + 12 + length] ^= 0x01  # the third record's payload CRC
open(bad, "wb").write(bytes(data))
reader = event_file_loader._make_tf_record_iterator(bad)  # the iterator the loader reads with
try:
    for _ in range(len(offsets)):
        next(reader)
    raise AssertionError("the corrupted record was read without error")
except tf.errors.DataLossError as e:
    assert "crc" in str(e).lower(), e
loaded = list(event_file_loader.RawEventFileLoader(bad).Load())
assert len(loaded) == 2, f"loader yielded {len(loaded)} records, expected the 2 before the bad one"
print("tensorboard: corrupted CRC rejected (DataLossError), loader stopped after 2 records")

# 3. The trace: Python reader == gbmoe-analyze --trace == expert_loads.jsonl on traced steps.
header, records = read_routing_trace.read_trace(read_routing_trace.trace_files(f"{run}/traces"))
assert header["num_layers"] == 2 and header["top_k"] == 2 and header["num_experts"] == 4, header
assert sorted({r["step"] for r in records}) == [2, 4, 6], sorted({r["step"] for r in records})
counts, tokens = read_routing_trace.selection(header, records)
subprocess.run([f"{build}/train/gbmoe-analyze", "--trace", f"{run}/traces", "--output",
                f"{work}/analysis"], check=True, stdout=subprocess.DEVNULL)
ours = read_routing_trace.selection_csv(header, counts, tokens)
theirs = open(f"{work}/analysis/trace_selection.csv").read()
assert ours == theirs, "python and gbmoe-analyze frequencies differ"
loads = {}
for line in open(f"{run}/expert_loads.jsonl"):
    r = json.loads(line)
    loads[r["step"]] = r["loads"]
for step in (2, 4, 6):
    for layer in range(2):
        per_expert = [0] * 4
        for r in records:
            if r["step"] == step and r["layer"] == layer:
                for ids in r["expert_ids"]:
                    for i in ids:
                        per_expert[i] += 1
        assert per_expert == [int(c) for c in loads[step][layer]], (step, layer, per_expert,
                                                                     loads[step][layer])
assert sum(tokens[0]) > 0 and all(sum(row) == 2 * t for row, t in zip(counts[0], tokens[0]))
print("routing trace: python reader == gbmoe-analyze --trace == expert loads of traced steps")
print("tensorboard_trace_test: ok")
