"""msgpack encoding of ``{name: ndarray}`` dicts, byte-compatible with ``msgpack_numpy``.

UNITER writes its img_db values with ``msgpack_numpy.patch()`` + ``msgpack.dumps(dump, use_bin_type=True)``.
Each array becomes the map ``{b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": [...],
b"data": <raw bytes>}``. We write and read that exact map ourselves instead of importing
``msgpack_numpy`` because its decoder unpickles object arrays (``kind == b"O"``), which would let
a downloaded feature store run code, and because ``patch()`` rewires msgpack for the whole
process. Only plain numeric arrays are accepted here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgpack
import numpy as np

_NUMERIC_KINDS = frozenset("biuf")


class CodecError(ValueError):
    """A value is not a msgpack map of plain numeric arrays."""


def _encode_array(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"only numeric arrays can be encoded, got dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        return {b"nd": True, b"type": arr.dtype.str, b"kind": b"", b"shape": list(arr.shape),
                b"data": arr.data}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_array(obj: dict):
    if b"nd" not in obj:
        return obj
    if obj[b"nd"] is not True or obj.get(b"kind", b"") not in (b"", ""):
        raise CodecError("only plain numeric arrays are supported (no scalars, structured or object arrays)")
    try:
        dtype = np.dtype(obj[b"type"])
        shape = tuple(int(n) for n in obj[b"shape"])
        data = obj[b"data"]
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"malformed array header ({e})") from None
    if dtype.kind not in _NUMERIC_KINDS:
        raise CodecError(f"non-numeric dtype {dtype}")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise CodecError(f"array data size does not match shape {shape} and dtype {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    return msgpack.packb(dict(arrays), use_bin_type=True, default=_encode_array)


def unpack_arrays(buf) -> dict[str, np.ndarray]:
    """Decode a value written by :func:`pack_arrays` or by msgpack_numpy; arrays are read-only views."""
    try:
        out = msgpack.unpackb(buf, raw=False, object_hook=_decode_array)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises a zoo of types (ExtraData, FormatError, StackError, ValueError)
        raise CodecError(f"not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict) or not all(isinstance(v, np.ndarray) for v in out.values()):
        raise CodecError("expected a map of arrays")
    return out
