"""Prints a GGUF file as JSON, through llama.cpp's own reader (gguf-py, vendored in the pinned
llama.cpp): the header version, every key with its GGUF type and value, every tensor with its
type, shape (ggml order) and the sha256 of its bytes. tests/it/gguf_export.rs compares two such
dumps (vlmpipe's export and llama.cpp's converter output for the same checkpoint).

    python gguf_dump.py FILE.gguf   (run with the venv tests/llama_cpp/build.sh makes)

Arrays of more than 64 elements are summarised as their length, element type and sha256 of the
JSON of their values, so a 65k-token vocabulary compares exactly without a 5 MB dump.
"""

import hashlib
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType


def field_value(field):
    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        sub = types[1] if len(types) > 1 else None
        values = field.contents()
        if sub == GGUFValueType.FLOAT32:
            # float32 through JSON: the exact bits, as hex, not a decimal rounding.
            values = [np.float32(v).tobytes().hex() for v in values]
        summary = {"array_of": sub.name if sub is not None else None, "len": len(values)}
        if len(values) > 64:
            summary["sha256"] = hashlib.sha256(
                json.dumps(values, ensure_ascii=False).encode("utf-8")).hexdigest()
        else:
            summary["values"] = values
        return summary
    value = field.contents()
    if types[0] in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return {"float": float(value), "bits": np.float32(value).tobytes().hex()
                if types[0] == GGUFValueType.FLOAT32 else None}
    return value


def main(path):
    reader = GGUFReader(path)
    kv = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kv[name] = {"type": field.types[0].name, "value": field_value(field)}
    tensors = {}
    for t in reader.tensors:
        tensors[t.name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest(),
        }
    out = {
        "version": int(reader.fields["GGUF.version"].parts[-1][0]),
        "alignment": int(reader.alignment),
        "kv_order": [k for k in reader.fields if not k.startswith("GGUF.")],
        "kv": kv,
        "tensor_order": [t.name for t in reader.tensors],
        "tensors": tensors,
    }
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
