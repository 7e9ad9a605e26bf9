#!/usr/bin/env python3
"""Tokenizes a corpus with an existing Hugging Face tokenizer.json (the `tokenizers` package) and
writes the token shards gbmoe-data writes ({train,val}.{bin,idx}, meta.json), for gbmoe-train's
data.dir. Input: DIR/<domain>/*.txt (one document per file) or JSON-lines files (plain or .gz)
with a text and a domain field; bad records are counted and reported, fatal only if all are bad.

Example:
  .venv/bin/python scripts/hf_tokenize.py --tokenizer hf/model/tokenizer.json \
      --jsonl corpus.jsonl.gz --text-field text --domain-field domain --output data/hf-corpus
"""
import argparse
import gzip
import json
import os
import random
import struct
import sys

from tokenizers import Tokenizer

FNV_OFFSET, FNV_PRIME, MASK = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>")


def fnv1a64(data, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def fail(msg):
    sys.exit(f"hf_tokenize: {msg}")


def read_dirs(root):
    docs = {}
    if not os.path.isdir(root):
        fail(f'--input "{root}" is not a directory')
    for domain in sorted(os.listdir(root)):
        d = os.path.join(root, domain)
        if domain.startswith(".") or not os.path.isdir(d):
            continue
        for base, _, files in sorted(os.walk(d)):
            for f in sorted(files):
                if f.endswith(".txt"):
                    with open(os.path.join(base, f), "rb") as fh:
                        raw = fh.read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        fail(f"{os.path.join(base, f)} is not valid UTF-8: {e}")
                    if text.strip():
                        docs.setdefault(domain, []).append(text)
    return docs, {}


def read_jsonl(files, text_field, domain_field):
    docs, bad, records = {}, {}, 0
    for path in files:
        if not os.path.isfile(path):
            fail(f'--jsonl file "{path}" does not exist')
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                records += 1
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    bad["with invalid UTF-8"] = bad.get("with invalid UTF-8", 0) + 1
                    continue
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    bad["that are not a JSON object"] = bad.get("that are not a JSON object", 0) + 1
                    continue
                text = record.get(text_field)
                domain = record.get(domain_field) if domain_field else "all"
                if not isinstance(text, str) or not isinstance(domain, str):
                    key = f'without a string field "{text_field}"' + (
                        f' or "{domain_field}"' if domain_field else "")
                    bad[key] = bad.get(key, 0) + 1
                elif not text.strip():
                    bad["with empty text"] = bad.get("with empty text", 0) + 1
                else:
                    docs.setdefault(domain, []).append(text)
    if sum(bad.values()) == records:
        fail(f"every one of the {records} records of {', '.join(files)} is bad: {bad}")
    return docs, bad


def write_split(out, split, vocab, domains, docs_by_domain):
    token_bytes = 2 if vocab <= 65535 else 4
    fmt = "<H" if token_bytes == 2 else "<I"
    documents, offset, bin_hash = [], 0, FNV_OFFSET
    with open(os.path.join(out, split + ".bin"), "wb") as fh:
        for d, docs in enumerate(docs_by_domain):
            for ids in docs:
                data = struct.pack(f"<{len(ids)}{fmt[1]}", *ids)
                fh.write(data)
                bin_hash = fnv1a64(data, bin_hash)
                documents.append((d, offset, len(ids)))
                offset += len(ids)
    idx = bytearray(b"GBMOEIDX") + struct.pack("<IIQQ", 1, token_bytes, vocab, len(domains))
    for name in domains:
        encoded = name.encode("utf-8")
        idx += struct.pack("<I", len(encoded)) + encoded
    idx += struct.pack("<Q", len(documents))
    for d, o, n in documents:
        idx += struct.pack("<IQQ", d, o, n)
    idx += struct.pack("<QQ", offset, bin_hash)
    idx += struct.pack("<Q", fnv1a64(idx))
    with open(os.path.join(out, split + ".idx"), "wb") as fh:
        fh.write(idx)
    return len(documents), offset


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("--input", help="directory of <domain>/*.txt documents")
    p.add_argument("--jsonl", help="JSON-lines files (plain or .gz), comma-separated")
    p.add_argument("--text-field", default="text")
    p.add_argument("--domain-field", default="domain", help='"" puts every record in domain all')
    p.add_argument("--output", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token", default="", help="end-of-document token (default: the first of "
                   + ", ".join(EOS_CANDIDATES) + " in the vocabulary)")
    a = p.parse_args()
    if bool(a.input) == bool(a.jsonl):
        fail("give exactly one of --input and --jsonl")
    if not 0 < a.val_fraction < 1:
        fail(f"--val-fraction ({a.val_fraction}) must be in (0, 1)")
    if os.path.exists(os.path.join(a.output, "train.idx")):
        fail(f'--output "{a.output}" already holds a dataset')
    try:
        tok = Tokenizer.from_file(a.tokenizer)
    except Exception as e:  # tokenizers raises its own exception types
        fail(f'--tokenizer "{a.tokenizer}" cannot be loaded: {e}')
    vocab = tok.get_vocab_size(with_added_tokens=True)
    names = [a.eos_token] if a.eos_token else [t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None]
    eos = tok.token_to_id(names[0]) if names else None
    if eos is None:
        fail(f"--eos-token ({a.eos_token or 'auto'}) is not in the vocabulary of {a.tokenizer}")

    docs, bad = read_dirs(a.input) if a.input else read_jsonl(
        [f for f in a.jsonl.split(",") if f], a.text_field, a.domain_field)
    domains = sorted(docs)
    for name in domains:
        if len(docs[name]) < 2:
            fail(f"domain {name} has {len(docs[name])} documents; each needs at least 2 (one for validation)")
    train, val = [], []
    for name in domains:
        encoded = [e.ids + [eos] for e in tok.encode_batch(docs[name], add_special_tokens=False)]
        rng = random.Random(f"{a.seed}/{name}")
        n_val = min(len(encoded) - 1, max(1, round(a.val_fraction * len(encoded))))
        val_set = set(rng.sample(range(len(encoded)), n_val))
        train.append([ids for i, ids in enumerate(encoded) if i not in val_set])
        val.append([ids for i, ids in enumerate(encoded) if i in val_set])
    os.makedirs(a.output, exist_ok=True)
    summary = {"tokenizer": os.path.abspath(a.tokenizer), "vocab_size": vocab, "eos_id": eos,
               "domains": domains, "bad_records": bad}
    for split, parts in (("train", train), ("val", val)):
        n_docs, n_tokens = write_split(a.output, split, vocab, domains, parts)
        summary[split] = {"documents": n_docs, "tokens": n_tokens}
    with open(os.path.join(a.output, "meta.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    for why, n in bad.items():
        print(f"hf_tokenize: skipped {n} records {why}", file=sys.stderr)
    print(f"hf_tokenize: {len(domains)} domains, vocabulary {vocab}, train {summary['train']}, "
          f"val {summary['val']} -> {a.output}")


if __name__ == "__main__":
    main()
