"""Reads an engine checkpoint with the reference Python safetensors library (safe_open) and
prints what it finds: the metadata, every tensor's dtype and shape, and whether the
checksum holds by the format's definition (SHA-256 of the file with the 64 checksum digits
read as '0'). Used by rust/tests/checkpoint_files.rs (python_safetensors_reads_the_file),
which compares the output with tests/fixtures/checkpoint_python.txt.

Usage: python checkpoint_check.py FILE
"""
import hashlib
import json
import sys

import numpy as np
from safetensors import safe_open

path = sys.argv[1]
with safe_open(path, framework="numpy") as f:
    meta = f.metadata()
    print("format", meta["format"], meta["format_version"])
    print("metadata keys", sorted(meta))
    state = json.loads(meta["state"])
    print("optimizer", state["optimizer"], "step", state["step"], "precision", state["precision"])
    print("run", meta.get("run"))
    config = json.loads(meta["engine_config"])
    print("seed", config["seed"], "optimizer", config["optimizer"]["name"], "rank", config["optimizer"]["rank"])
    for name in sorted(f.keys()):
        s = f.get_slice(name)
        print(name, s.get_dtype(), s.get_shape())
        if s.get_dtype() == "F32":
            # numpy reads it: finite, as the engine promises
            assert np.isfinite(f.get_tensor(name)).all(), name

raw = bytearray(open(path, "rb").read())
prefix = b'{"__metadata__":{"checksum":"sha256:'
at = 8 + len(prefix)
assert raw[8:at] == prefix
stored = raw[at:at + 64].decode()
raw[at:at + 64] = b"0" * 64
print("checksum", "ok" if hashlib.sha256(raw).hexdigest() == stored else "MISMATCH")
