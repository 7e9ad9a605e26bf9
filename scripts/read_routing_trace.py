#!/usr/bin/env python3
"""Reads gbmoe routing traces (RUN/traces/rank<r>.gbrt, layout in train/routing_trace.h) and
rebuilds per-domain expert selection frequencies. Needs only the standard library.

    scripts/read_routing_trace.py runs/x/traces             # CSV to stdout
    scripts/read_routing_trace.py runs/x/traces --steps 10:20 --output freq.csv

As a module: read_trace(paths) -> (header, records); selection(header, records) ->
(counts[layer][domain][expert], tokens[layer][domain]).
"""
import argparse
import glob
import os
import struct
import sys

MAGIC = b"GBMOERT1"
VERSION = 1


class TraceError(ValueError):
    pass


def _read_header(data, path):
    if data[:8] != MAGIC:
        raise TraceError(f"{path}: not a gbmoe routing trace (bad magic)")
    version, experts, top_k, layers, num_domains = struct.unpack_from("<5I", data, 8)
    if version != VERSION:
        raise TraceError(f"{path}: version {version}, this reader knows {VERSION}")
    pos = 28
    domains = []
    for _ in range(num_domains):
        (n,) = struct.unpack_from("<I", data, pos)
        domains.append(data[pos + 4:pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    header = {"num_experts": experts, "top_k": top_k, "num_layers": layers, "domains": domains}
    return header, pos


def trace_files(path):
    """The *.gbrt files of a directory in name order, or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "*.gbrt")))
    if not files:
        raise TraceError(f"no *.gbrt routing trace in {path}")
    return files


def read_trace(paths):
    """(header, records); a record is a dict step, rank, micro_batch, layer, domain (list of N
    ints), expert_ids (list of N lists of K ints)."""
    header, records = None, []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        h, pos = _read_header(data, path)
        if header is None:
            header = h
        elif h != header:
            raise TraceError(f"{path}: header differs from that of {paths[0]}")
        k = h["top_k"]
        while pos < len(data):
            if len(data) - pos < 24:
                raise TraceError(f"{path} at byte {pos}: truncated record header")
            step, rank, micro, layer, n = struct.unpack_from("<q4I", data, pos)
            pos += 24
            need = 2 * n * (k + 1)
            if len(data) - pos < need:
                raise TraceError(f"{path} at byte {pos}: truncated record ({need} bytes needed)")
            domain = list(struct.unpack_from(f"<{n}H", data, pos))
            flat = struct.unpack_from(f"<{n * k}H", data, pos + 2 * n)
            pos += need
            records.append({"step": step, "rank": rank, "micro_batch": micro, "layer": layer,
                            "domain": domain,
                            "expert_ids": [list(flat[i * k:(i + 1) * k]) for i in range(n)]})
    return header, records


def selection(header, records, first_step=0, last_step=None):
    """counts[l][d][i]: tokens of domain d whose top-k at layer l holds expert i;
    tokens[l][d]: tokens of domain d (records with step in [first_step, last_step])."""
    L, M, E = header["num_layers"], len(header["domains"]), header["num_experts"]
    counts = [[[0] * E for _ in range(M)] for _ in range(L)]
    tokens = [[0] * M for _ in range(L)]
    for r in records:
        if r["step"] < first_step or (last_step is not None and r["step"] > last_step):
            continue
        c, t = counts[r["layer"]], tokens[r["layer"]]
        for d, ids in zip(r["domain"], r["expert_ids"]):
            t[d] += 1
            for i in ids:
                c[d][i] += 1
    return counts, tokens


def selection_csv(header, counts, tokens):
    """Rows layer,domain,expert,selections,frequency (as gbmoe-analyze --trace writes)."""
    lines = ["layer,domain,expert,selections,frequency"]
    for l, layer in enumerate(counts):
        for d, row in enumerate(layer):
            n = tokens[l][d]
            for i, c in enumerate(row):
                lines.append(f"{l},{header['domains'][d]},{i},{c},{c / n if n else 0.0:.9g}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a .gbrt file or a directory of them (RUN/traces)")
    p.add_argument("--steps", default="", help="FIRST:LAST steps to count (default: all)")
    p.add_argument("--output", default="-", help="CSV file (default: stdout)")
    a = p.parse_args(argv)
    first, last = 0, None
    if a.steps:
        lo, _, hi = a.steps.partition(":")
        first, last = int(lo or 0), (int(hi) if hi else None)
    try:
        header, records = read_trace(trace_files(a.trace))
    except TraceError as e:
        sys.exit(f"read_routing_trace: {e}")
    csv = selection_csv(header, *selection(header, records, first, last))
    if a.output == "-":
        sys.stdout.write(csv)
    else:
        with open(a.output, "w") as f:
            f.write(csv)


if __name__ == "__main__":
    main()
