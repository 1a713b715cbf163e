"""Request bodies to image batches: every malformed or out-of-range input is a :class:`BadRequest`.

Two formats: JSON ``{"images": [[[[...]]]]}`` (nested lists, shape (B, C, H, W)) and a binary ``.npy``
array (``application/x-npy``). A ``.npy`` header is checked before any data is read (a header may
claim any shape); only float dtypes are accepted and the data is read with ``np.frombuffer``, so a body
never unpickles anything (the guarantee ``np.load(allow_pickle=False)`` gives, without a second parse).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence

import numpy as np

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream")
NPY_MAGIC = b"\x93NUMPY"


class BadRequest(Exception):
    """A request that cannot be served: HTTP ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the parser said


def media_type(header: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return (header or "").split(";", 1)[0].strip().lower()


def decode_body(body: bytes, content_type: str | None) -> np.ndarray:
    """The array a request body holds (not yet checked against the model)."""
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        return _decode_json(body)
    if kind in NPY_TYPES:
        return _decode_npy(body)
    raise BadRequest(
        415,
        f"unsupported content type {kind or '(none)'!r}: send application/json "
        '({"images": nested lists (B, C, H, W)}) or application/x-npy (a .npy array)',
    )


def _decode_json(body: bytes) -> np.ndarray:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise BadRequest(400, f"malformed JSON: {err}") from None
    if not isinstance(data, dict) or set(data) != {"images"}:
        raise BadRequest(
            400, 'the JSON body must be an object {"images": nested lists of shape (B, C, H, W)}'
        )
    images = data["images"]
    if not isinstance(images, list):
        raise BadRequest(400, '"images" must be nested lists of numbers of shape (B, C, H, W)')
    if b"true" in body or b"false" in body:  # numpy would read booleans as 0/1
        raise BadRequest(422, "images must hold numbers in [0, 1], got booleans")
    try:
        array = np.array(images)
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise BadRequest(
            422, "images must be a regular (B, C, H, W) array of numbers: the lists are ragged"
        ) from None
    if array.dtype.kind not in "iuf":
        raise BadRequest(422, f"images must hold numbers in [0, 1], got {_dtype_words(array)}")
    return array


def _reject_constant(name: str) -> float:
    raise BadRequest(422, f"images must be finite numbers in [0, 1], got {name}")


def _dtype_words(array: np.ndarray) -> str:
    if array.dtype.kind == "O":
        return "null or mixed values"
    if array.dtype.kind == "U":
        return "strings"
    return f"dtype {array.dtype}"


def _decode_npy(body: bytes) -> np.ndarray:
    if not body.startswith(NPY_MAGIC):
        raise BadRequest(400, "malformed npy: the body does not start with the .npy magic \\x93NUMPY")
    shape, dtype, fortran, header_end = _npy_header(body)
    expected = math.prod(shape) * dtype.itemsize
    if len(body) - header_end != expected:
        raise BadRequest(
            400,
            f"malformed npy: the header says {shape} {dtype} ({expected} bytes) but the body carries "
            f"{len(body) - header_end} data bytes",
        )
    # The header was checked above (a float dtype, the exact byte count): the data is read in place. No
    # pickle can be read here: object arrays are refused with every other non-float dtype.
    data = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=header_end)
    return data.reshape(shape, order="F" if fortran else "C")


_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?f[248])', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \} *\n?"
)


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, Fortran order and data offset from a .npy header, checked before anything is
    allocated (a header may claim any shape). ``np.save``'s own layout is matched by a regular
    expression; anything else goes through ``ast.literal_eval`` (never ``eval``)."""
    if len(body) < 10:
        raise BadRequest(400, "malformed npy: truncated header")
    major = body[6]
    if major == 1:
        size, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3):
        if len(body) < 12:
            raise BadRequest(400, "malformed npy: truncated header")
        size, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise BadRequest(400, f"malformed npy: unknown format version {major}")
    if start + size > len(body) or size > 65536:
        raise BadRequest(400, "malformed npy: truncated or oversized header")
    text = body[start : start + size].decode("latin1")
    fast = _NPY_HEADER.fullmatch(text)
    if fast is not None:
        descr, order, dims = fast.groups()
        try:
            shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        except ValueError:
            raise BadRequest(400, f"malformed npy: bad shape ({dims})") from None
        header = {"descr": descr, "fortran_order": order == "True", "shape": shape}
    else:
        try:
            header = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise BadRequest(400, "malformed npy: unreadable header") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise BadRequest(400, "malformed npy: the header must hold descr, fortran_order and shape")
    shape = header["shape"]
    if (
        not isinstance(shape, tuple)
        or len(shape) > 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape)
    ):
        raise BadRequest(400, f"malformed npy: bad shape {shape!r}")
    descr = header["descr"]
    if not isinstance(descr, str):
        raise BadRequest(422, "images must be a float array (.npy of float16/32/64), got a structured dtype")
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise BadRequest(400, f"malformed npy: unknown dtype {descr!r}") from None
    if dtype.kind != "f":
        raise BadRequest(
            422, f"images must be a float array in [0, 1], got dtype {dtype}; send x.astype(np.float32) / 255"
        )
    if not isinstance(header["fortran_order"], bool):
        raise BadRequest(400, "malformed npy: fortran_order must be True or False")
    return shape, dtype, header["fortran_order"], start + size


def check_batch(array: np.ndarray, input_shape: Sequence[int], *, max_batch: int) -> np.ndarray:
    """``array`` as a contiguous float32 (B, C, H, W) batch in [0, 1] of the model's shape, or BadRequest."""
    expected = (*input_shape,)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        want = ", ".join(map(str, expected))
        raise BadRequest(422, f"images have shape {tuple(array.shape)}, expected (B, {want}) with B >= 1")
    if array.shape[0] == 0:
        raise BadRequest(422, "the batch is empty: send at least one image")
    if array.shape[0] > max_batch:
        raise BadRequest(
            413, f"a batch of {array.shape[0]} images is over this server's --max-batch {max_batch}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(array, dtype=np.float32)
    if not x.flags.writeable:  # read in place from the body: torch wants its own memory
        x = x.copy()
    if not np.isfinite(x).all():
        raise BadRequest(422, "images must be finite: the batch holds NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise BadRequest(
            422, f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; send pixels divided by 255"
        )
    return x
