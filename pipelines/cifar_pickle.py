"""The restricted unpickler for CIFAR's python files: code never runs, numpy never sees state.

CIFAR's pickles were written by Python 2's cPickle at protocol 2; Python 3's pickle writes the
same arrays at protocols 2-4 and, at 5, through ``_frombuffer``. Between them they name six
globals: ``numpy.core.multiarray._reconstruct`` (or ``numpy._core``), ``numpy.ndarray``,
``numpy.dtype``, ``numpy.core.numeric._frombuffer`` (or ``numpy._core``) and ``_codecs.encode``
(how protocol 2 writes bytes). Two lines check them:

1. ``scan_globals`` reads the opcodes alone (``pickletools.genops``, nothing built): a global
   outside the allow-list, an opcode that builds objects without naming one, a name computed at
   load time, a length prefix longer than the rest of the file or a memo slot beyond the opcodes
   read so far (the C unpickler sizes its memo to twice the slot: one 5-byte opcode could ask
   for 64 GiB) is refused before anything is unpickled.
2. ``RestrictedUnpickler`` resolves the allowed names to placeholders of its own, never to
   numpy. ``numpy.dtype(...)`` gives a ``_Dtype`` and ``_reconstruct(...)`` an ``_Array``; the
   pickle's BUILD hands their state to our ``__setstate__``, which checks it completely (a plain
   integer type in native byte order, no fields or subarray; one or two dimensions, C order, and
   exactly as many bytes as the shape needs, bytes the file itself holds) and only then builds
   the array with ``np.frombuffer`` over a copy of those bytes. State given twice, state given
   to anything else, or a call to a placeholder that is not a constructor is refused. What the
   placeholders build in one load (arrays and ``_codecs.encode`` results) may not exceed twice
   the file's size, so shared references cannot multiply one string into many arrays.

Every refusal is an ``UnsafePickleError`` (a ``DataError``) naming the file; anything else that
goes wrong while unpickling (a damaged file, a MemoryError) is a ``DataError`` naming it too.
The arrays replace their placeholders in the loaded object and, when it is a dict (as every
CIFAR file is), in its values.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
import sys
from pathlib import Path

import numpy as np

from .errors import DataError


class UnsafePickleError(DataError):
    """A pickle names a global outside the allow-list, or gives one of them state or arguments
    CIFAR's files never hold: refused before numpy or any other code sees it."""


# The allowed globals: (module, name) -> which placeholder stands for it.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
}
# Opcodes that build objects without naming a global the allow-list could check, or that take
# buffers from outside the file.
REFUSED_OPCODES = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "PERSID", "BINPERSID", "EXT1", "EXT2",
                   "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                  "BINSTRING", "STRING"}
PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
# A CIFAR file's dicts hold a handful of entries (a batch: labels, data, filenames, batch_label;
# meta: three). Bounding them bounds hash-collision work, which the C unpickler would otherwise
# do in time quadratic in the file's size (integer keys that all hash alike).
MAX_KEYED_ITEMS = 64
# The plain integer types arrays may have: numpy's pickled code -> its itemsize.
INTEGER_CODES = {f"{kind}{size}": size for kind in "ui" for size in (1, 2, 4, 8)}
NATIVE = "<" if sys.byteorder == "little" else ">"
LATIN1 = codecs.lookup("latin-1").name


def _check_global(module, name, source) -> None:
    if (module, name) not in ALLOWED:
        raise UnsafePickleError(f"{source}: the pickle names {module}.{name}, which a CIFAR file "
                                "never does; refused without unpickling anything (allowed: "
                                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED))})")


class _KeyedItems:
    """Counts the dict and set entries a pickle builds, from each opcode's stack effect: the
    items above a MARK are what SETITEMS, DICT, ADDITEMS and FROZENSET take."""

    def __init__(self, source):
        self.source, self.marks, self.items = source, [], 0

    def step(self, op) -> None:
        if op.name == "MARK":
            self.marks.append(0)
            return
        before = op.stack_before
        if pickletools.markobject in before:
            taken = self.marks.pop() if self.marks else 0
            self.items += taken // 2 if op.name in ("SETITEMS", "DICT") else \
                taken if op.name in ("ADDITEMS", "FROZENSET") else 0
            net = len(op.stack_after) - before.index(pickletools.markobject)
        else:
            self.items += op.name == "SETITEM"
            net = len(op.stack_after) - len(before)
        if self.marks:
            self.marks[-1] += net
        if self.items > MAX_KEYED_ITEMS:
            raise UnsafePickleError(f"{self.source}: the pickle builds more than "
                                    f"{MAX_KEYED_ITEMS} dict or set entries; a CIFAR file holds "
                                    "a handful; refused")


def scan_globals(data: bytes, source) -> None:
    """Check every global a pickle names, and its claims on memory, from its opcodes alone.

    STACK_GLOBAL (protocol 4+) takes its two names from the stack: the strings are tracked
    through the memo, and a name that cannot be known from the opcodes is refused. genops reads
    every length-prefixed argument from the file, so a length beyond the file's end is refused
    here, before the unpickler would allocate it.
    """
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    depth = _KeyedItems(source)
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            depth.step(op)
            if op.name in REFUSED_OPCODES:
                raise UnsafePickleError(f"{source}: the pickle uses opcode {op.name}, which "
                                        "builds objects outside the allow-list; refused")
            if op.name == "GLOBAL":
                _check_global(*arg.split(" ", 1), source)
            elif op.name == "STACK_GLOBAL":
                module, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
                if module is None or name is None:
                    raise UnsafePickleError(f"{source}: the pickle names a global through a "
                                            "computed value (STACK_GLOBAL of something other "
                                            "than two strings); refused")
                _check_global(module, name, source)
            if op.name in PUT_OPCODES and arg > count:
                # Picklers number memo slots from 0 in order; the C unpickler would size its
                # memo to twice this slot before storing anything in it.
                raise UnsafePickleError(f"{source}: the pickle stores into memo slot {arg} after "
                                        f"{count} opcodes, claiming {16 * arg:,} bytes of memo "
                                        f"for a {len(data):,}-byte file; refused")
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in PUT_OPCODES:
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name in STRING_OPCODES:
                pushed.append(arg if isinstance(arg, str) else None)
            elif op.name not in ("FRAME", "PROTO"):
                pushed.append(None)
    except UnsafePickleError:
        raise
    except Exception as e:   # genops' word for a damaged or truncated pickle (mostly ValueError)
        raise DataError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------ the placeholders

class _Global:
    """What an allowed name resolves to: calls go to the unpickler's checked constructor."""

    __slots__ = ("_unpickler", "_kind")

    def __init__(self, unpickler, kind):
        self._unpickler, self._kind = unpickler, kind

    def __call__(self, *args):
        return getattr(self._unpickler, f"_call_{self._kind}")(*args)

    def __repr__(self):
        return self._kind

    def __setstate__(self, state):
        self._unpickler._refuse(f"the pickle gives state to the global {self._kind}")


class _Dtype:
    """numpy.dtype(code, align, copy) as a pickle calls it: a code and, after BUILD, a byte
    order. Becomes a real dtype only when an array built from checked state asks for it."""

    __slots__ = ("_unpickler", "code", "order", "stated")

    def __init__(self, unpickler, code):
        self._unpickler, self.code, self.order, self.stated = unpickler, code, None, False

    def __setstate__(self, state):
        self._unpickler._dtype_state(self, state)

    def __repr__(self):
        return f"numpy.dtype({self.code!r})"

    def dtype(self) -> np.dtype:
        order = self.order or ("|" if INTEGER_CODES[self.code] == 1 else NATIVE)
        return np.dtype(order + self.code)


class _Array:
    """An array whose state the pickle has yet to give (after _reconstruct) or has given."""

    __slots__ = ("_unpickler", "array")

    def __init__(self, unpickler, array=None):
        self._unpickler, self.array = unpickler, array

    def __repr__(self):
        return "numpy.ndarray"

    def __setstate__(self, state):
        if self.array is not None:
            self._unpickler._refuse("the pickle gives an array its state a second time")
        self.array = self._unpickler._array_state(state)


def _is_int(value) -> bool:
    return type(value) is int


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals, to checked placeholders; refuses every other one.

    `size`: the file's size in bytes (what the arrays and encoded strings may add up to, twice
    over); read from `file` when not given."""

    def __init__(self, file, source, size: int | None = None):
        super().__init__(file, encoding="latin1", fix_imports=False)
        self.source = source
        if size is None:     # what is left of the file from here
            here = file.tell()
            size = file.seek(0, io.SEEK_END) - here
            file.seek(here)
        self.size = size
        self.left = 2 * size

    def find_class(self, module, name):
        _check_global(module, name, self.source)
        return _Global(self, ALLOWED[(module, name)])

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: the pickle asks for a persistent object; refused")

    def load(self):
        return _finish(super().load(), self)

    # -- checks

    def _refuse(self, why):
        raise UnsafePickleError(f"{self.source}: {why}; refused before numpy sees it")

    def _charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            self._refuse(f"the pickle's arrays and encoded bytes would take more than twice the "
                         f"file's {self.size:,} bytes ({what}: {nbytes:,} more after "
                         f"{2 * self.size - self.left:,})")
        self.left -= nbytes

    def _call_ndarray(self, *args):
        self._refuse("the pickle calls numpy.ndarray directly")

    def _call_encode(self, text=None, encoding="utf-8", errors="strict", *rest):
        if rest or not isinstance(text, str) or not isinstance(encoding, str) \
                or errors != "strict":
            self._refuse("the pickle calls _codecs.encode with other than (text, 'latin1')")
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            name = None
        if name != LATIN1:
            raise UnsafePickleError(f"{self.source}: _codecs.encode called with {encoding!r}; "
                                    "only latin-1 text (a protocol-2 pickle's bytes) is accepted")
        self._charge(len(text), "_codecs.encode")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            self._refuse("the pickle encodes text beyond latin-1 as bytes")

    def _call_dtype(self, code=None, align=False, copy=False, *rest):
        if isinstance(code, bytes):
            code = code.decode("latin-1")
        if rest or not isinstance(code, str) or align not in (False, 0) \
                or copy not in (True, False, 1, 0) or type(align) not in (bool, int) \
                or type(copy) not in (bool, int):
            self._refuse(f"the pickle calls numpy.dtype with arguments numpy never writes "
                         f"({code!r:.40}, ...)")
        if code not in INTEGER_CODES:
            objects = " (it holds Python objects)" if code.startswith("O") else ""
            raise UnsafePickleError(f"{self.source}: numpy dtype {code!r:.40} is not a plain "
                                    f"integer type{objects}: CIFAR's arrays are uint8 pixels and "
                                    "integer labels; refused before numpy sees it")
        return _Dtype(self, code)

    def _dtype_state(self, stub: _Dtype, state) -> None:
        # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags) with
        # None, None, None, -1, -1, 0 for every plain number type.
        if stub.stated:
            self._refuse("the pickle gives a dtype its state a second time")
        if type(state) is not tuple or len(state) != 8 or not all(map(_is_int, state[5:])) \
                or not _is_int(state[0]) or state[0] != 3 or state[2:] != (None, None, None, -1, -1, 0):
            self._refuse(f"the pickle gives numpy dtype {stub.code} the state {_brief(state)}: "
                         "only numpy's own (3, byte order, None, None, None, -1, -1, 0) is read, "
                         "never fields, a subarray, an item size or flags")
        order = state[1]
        allowed = ("|",) if INTEGER_CODES[stub.code] == 1 else (NATIVE,)
        if order not in allowed:
            self._refuse(f"the pickle gives numpy dtype {stub.code} the byte order "
                         f"{_brief(order)}, not this machine's {allowed[0]!r}")
        stub.order, stub.stated = order, True

    def _call_reconstruct(self, subtype=None, shape=None, typecode=None, *rest):
        if rest or not (isinstance(subtype, _Global) and subtype._kind == "ndarray") \
                or type(shape) is not tuple or shape != (0,) or not _is_int(shape[0]) \
                or typecode not in ("b", b"b"):
            self._refuse("the pickle calls _reconstruct with other arguments than numpy's "
                         "(numpy.ndarray, (0,), b'b')")
        return _Array(self)

    def _call_frombuffer(self, buffer=None, dtype=None, shape=None, order=None, *rest):
        if rest or not isinstance(buffer, (bytes, bytearray)) or order != "C":
            self._refuse("the pickle calls _frombuffer with other than (bytes, dtype, shape, 'C')")
        return _Array(self, self._build(shape, dtype, buffer))

    def _array_state(self, state) -> np.ndarray:
        # numpy writes (1, shape, dtype, is_fortran, raw bytes); before that, without the 1.
        if type(state) is tuple and len(state) == 5 and _is_int(state[0]) and state[0] == 1:
            state = state[1:]
        if type(state) is not tuple or len(state) != 4:
            self._refuse(f"the pickle gives an array state {_brief(state)}")
        shape, dtype, fortran, raw = state
        if fortran is not False and not (_is_int(fortran) and fortran == 0):
            self._refuse("the pickle gives an array Fortran order: CIFAR's are C-ordered")
        if isinstance(raw, str):     # a Python 2 str record, decoded as latin-1
            self._check_size(shape, dtype, len(raw))
            self._charge(len(raw), "array bytes")
            try:
                raw = raw.encode("latin-1")
            except UnicodeEncodeError:
                self._refuse("the pickle gives an array text beyond latin-1 as its bytes")
        elif not isinstance(raw, (bytes, bytearray)):
            self._refuse(f"the pickle gives an array a {type(raw).__name__} as its bytes")
        return self._build(shape, dtype, raw)

    def _check_size(self, shape, dtype, held: int) -> int:
        # (the bytes check below bounds every array by the file; this keeps the product of
        # even an empty array's dimensions within numpy's 64-bit sizes)
        if type(shape) is not tuple or len(shape) not in (1, 2) \
                or not all(_is_int(n) and 0 <= n < 2**31 for n in shape):
            self._refuse(f"the pickle gives an array the shape {_brief(shape)}: CIFAR's arrays "
                         "have one or two dimensions, of fewer than 2^31 items each")
        if not isinstance(dtype, _Dtype):
            self._refuse(f"the pickle gives an array a {type(dtype).__name__} as its dtype")
        nbytes = math.prod(shape) * INTEGER_CODES[dtype.code]
        if nbytes != held:
            self._refuse(f"the pickle gives an array of shape {shape} and dtype {dtype.code} "
                         f"({nbytes:,} bytes) {held:,} bytes of data, not exactly its own")
        return nbytes

    def _build(self, shape, dtype, raw) -> np.ndarray:
        nbytes = self._check_size(shape, dtype, len(raw))
        self._charge(nbytes, "array bytes")
        # Checked: the bytes are exactly the array's, so numpy reads nothing else; copied, so
        # the array owns its memory and is writable, as numpy's own unpickling gives it.
        return np.frombuffer(raw, dtype=dtype.dtype(), count=math.prod(shape)).reshape(shape).copy()


def _brief(value) -> str:
    """What a refused value is, by type and size: never its repr, which for a hostile object
    (one string shared a million times through the memo) can be far larger than the file."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() < 64 else f"an int of {value.bit_length()} bits"
    if isinstance(value, (str, bytes, bytearray, tuple, list, dict)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _finish(obj, unpickler: RestrictedUnpickler):
    """The arrays in place of their placeholders: the object itself, or a dict's values."""
    def real(value):
        if isinstance(value, _Array):
            if value.array is None:
                unpickler._refuse("the pickle leaves an array without its state")
            return value.array
        if isinstance(value, _Dtype):
            return value.dtype()
        return value
    if isinstance(obj, dict):
        return {k: real(v) for k, v in obj.items()}
    return real(obj)


def safe_load(path: Path):
    """Unpickle a CIFAR file through the allow-list and the checked placeholders (see the
    module docstring). Every failure is a DataError naming `path`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except MemoryError:
        raise DataError(f"{path}: out of memory reading {Path(path).stat().st_size:,} bytes") \
            from None
    scan_globals(data, path)
    try:
        return RestrictedUnpickler(io.BytesIO(data), path, size=len(data)).load()
    except UnsafePickleError:
        raise
    except MemoryError:
        raise DataError(f"{path}: out of memory unpickling a {len(data):,}-byte file") from None
    except Exception as e:   # a damaged file: pickle raises many types
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
