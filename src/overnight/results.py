"""How a result is stored in the ledger, and read back for export.

A result is the JSON of the output row's fields (`output`, `scores`, `usage`, ...). An embedding
is the exception: as JSON text a 384-d vector takes ~5.6 KB, so its `output` is kept beside
the JSON as little-endian float32 bytes (1.5 KB) — the precision the models produce, and what
vector stores and Arrow readers (`fixed_size_list<float32>`) expect.
"""

from __future__ import annotations

from typing import Any

import orjson

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def encode(fields: dict[str, Any], vector_output: bool = False) -> tuple[bytes, bytes | None]:
    """(result JSON, vector bytes or None). With `vector_output`, a numeric `output` sequence is
    split off as float32 bytes; anything else stays in the JSON."""
    if vector_output:
        import numpy as np  # here, not at the top: only embeddings need it (~0.1 s to import)

        out = fields.get("output")
        if isinstance(out, np.ndarray | list) and len(out) > 0:
            try:
                vector = np.asarray(out, dtype="<f4")
            except (TypeError, ValueError):
                vector = None
            if vector is not None and vector.ndim == 1:
                rest = {k: v for k, v in fields.items() if k != "output"}
                return orjson.dumps(rest, option=_NUMPY), vector.tobytes()
    return orjson.dumps(fields, option=_NUMPY), None


def decode(result: bytes, vector: bytes | None) -> dict[str, Any]:
    """The output row's fields; a stored vector comes back as a float32 numpy array under
    `output`, first, as it was."""
    fields = orjson.loads(result)
    if vector is None:
        return fields
    import numpy as np

    return {"output": np.frombuffer(vector, dtype="<f4"), **fields}
