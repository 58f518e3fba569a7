"""Hostile CIFAR pickles that name only allowed globals: object state numpy would trust, arrays
the file does not back, claims far beyond the file's size, labels of the wrong type.

Every read runs in a child process (forked, one per case, from a worker that imports only numpy
and pipelines.cifar), with its address space capped: a segmentation fault or an allocation the
machine cannot give shows as this test failing with the case's name, not as a dead test run or
an exhausted machine. The pickles are assembled opcode by opcode, the way Python 2's cPickle
wrote the real files (GLOBAL, SHORT_BINSTRING/BINSTRING, REDUCE/BUILD).
"""

import json
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

from pipelines import DataError, cifar
from pipelines.cifar_write import as_py2, py2_pickle, write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIXELS = 3 * 32 * 32

# ------------------------------------------------------------------ a small pickle assembler


def glob(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def s(data: bytes):
    """A Python 2 str record (SHORT_BINSTRING / BINSTRING), as cPickle wrote bytes and text."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def b(data: bytes):
    """A Python 3 bytes object (SHORT_BINBYTES / BINBYTES), as protocols 3 and up write it."""
    return (b"C" + bytes([len(data)]) if len(data) < 256 else b"B" + struct.pack("<I", len(data))) + data


def num(n):
    if n is True or n is False:
        return b"\x88" if n else b"\x89"
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    body = pickle.encode_long(n)
    return b"\x8a" + bytes([len(body)]) + body


def tup(*items):
    return b"(" + b"".join(items) + b"t"


def lst(*items):
    return b"](" + b"".join(items) + b"e"


def dct(pairs):
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def put(i):
    return b"q" + bytes([i])


def get(i):
    return b"h" + bytes([i])


def dtype_state(endian=b"|", subarray=b"N", names=b"N", fields=b"N", elsize=-1, alignment=-1,
                flags=0, version=3):
    return tup(num(version), s(endian), subarray, names, fields, num(elsize), num(alignment),
               num(flags))


def dtype(code=b"u1", state=None, memo=None):
    """numpy.dtype(code, 0, 1), BUILD with `state` (numpy's own state for code when None)."""
    if state is None:     # numpy's own: '|' and the size for void types, '<' for wider numbers
        void = code[:1] == b"V"
        state = dtype_state(b"|" if void or code[-1:] == b"1" else b"<",
                            elsize=int(code[1:]) if void else -1, alignment=1 if void else -1)
    head = glob("numpy", "dtype") + tup(s(code), num(0), num(1)) + b"R"
    return head + (put(memo) if memo is not None else b"") + state + b"b"


def array_state(shape, dt, raw=b"", fortran=False, version=1, raw_op=None):
    """(1, shape, dt, fortran, raw); `raw_op` the opcodes that push raw, when not a literal."""
    return tup(num(version), tup(*map(num, shape)), dt, num(fortran), raw_op or s(raw))


def array(shape, dt, raw=b"", fortran=False, memo=None, raw_op=None):
    """numpy.core.multiarray._reconstruct(ndarray, (0,), 'b'), BUILD (1, shape, dt, fortran, raw)."""
    head = (glob("numpy.core.multiarray", "_reconstruct")
            + tup(glob("numpy", "ndarray"), tup(num(0)), s(b"b")) + b"R")
    state = array_state(shape, dt, raw, fortran, raw_op=raw_op)
    return head + (put(memo) if memo is not None else b"") + state + b"b"


def frombuffer(raw, dt, shape, order=b"C"):
    """numpy.core.numeric._frombuffer(raw, dt, shape, order): what protocol 5 pickles hold."""
    return glob("numpy.core.numeric", "_frombuffer") + tup(b(raw), dt, tup(*map(num, shape)), s(order)) + b"R"


def record(data, labels, extra=b""):
    """A cifar10-py batch: {'data': ..., 'labels': ...} at protocol 2."""
    return b"\x80\x02" + dct([(s(b"data"), data), (s(b"labels"), labels)])[:-1] + extra + b"u."


def pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n * PIXELS, dtype=np.uint8).tobytes()


def claim(shape, order=b"C"):
    """One byte in the file claimed as an array of `shape`: _frombuffer with a uint8 dtype given
    a subarray of that shape (its item stays one byte, so numpy's size check passes)."""
    sub = dtype(b"u1", dtype_state(subarray=tup(dtype(), tup(*map(num, shape)))))
    return frombuffer(b"\x05", sub, shape, order)


def good_data(n):
    return array((n, PIXELS), dtype(), pixels(n))


def good_labels(n):
    return lst(*(num(i % 10) for i in range(n)))


# ------------------------------------------------------------------ reading in child processes

WORKER = r"""
import json, os, resource, signal, sys, types
root = sys.argv[1]
# pipelines/__init__ imports torch (seconds a process on a loaded machine); cifar needs numpy only.
package = types.ModuleType("pipelines")
package.__path__ = [os.path.join(root, "pipelines")]
sys.modules["pipelines"] = package
import numpy as np
from pipelines import cifar
from pipelines.errors import DataError

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith(key + ":"))

def canonical(images, labels):
    # What a clean read must give: uint8 (N, 3, 32, 32) and int64 (N,), C-ordered, owning or
    # viewing memory numpy allocated (never a view into the file's bytes with other strides).
    ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (3, 32, 32)
          and labels.dtype == np.int64 and labels.shape == (len(images),)
          and images.flags.c_contiguous and labels.flags.c_contiguous
          and images.dtype.isnative and labels.dtype.isnative)
    return {"canonical": bool(ok), "shape": list(images.shape), "labels": list(labels.shape)}

def read(case):
    if case["read"] == "split":
        got = cifar.read_split(case["path"], case["fmt"], case["split"])
        return canonical(got.images, got.labels)
    data, labels = cifar.read_pickle_batch(cifar.Path(case["path"]), case["fmt"])
    ok = (isinstance(data, np.ndarray) and isinstance(labels, np.ndarray)
          and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
          and data.flags.c_contiguous)
    if not ok:
        return {"canonical": False, "shape": repr(getattr(data, "shape", data))[:200]}
    return canonical(data.reshape(-1, 3, 32, 32), labels)

def run(case):
    signal.alarm(case.get("timeout", 60))
    if case.get("limit_mb"):
        cap = (status("VmSize") + case["limit_mb"]) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base = status("VmHWM")
    try:
        result = {"outcome": "ok", **read(case)}
    except DataError as e:
        result = {"outcome": "refused", "type": type(e).__name__, "message": str(e)}
    except BaseException as e:
        result = {"outcome": "raised", "type": type(e).__name__, "message": str(e)[:300]}
    result["grew_mb"] = status("VmHWM") - base
    return result

if sys.argv[2] == "cases":
    for case in json.load(sys.stdin):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, json.dumps(run(case)).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            text = f.read()
        _, code = os.waitpid(pid, 0)
        if os.WIFSIGNALED(code):
            result = {"outcome": "crashed", "signal": os.WTERMSIG(code)}
        else:
            result = json.loads(text)
        print(json.dumps(result), flush=True)
else:   # fuzz: every file in order, in this one process; a crash leaves the last "start" line
    spec = json.load(sys.stdin)
    cap = (status("VmSize") + spec["limit_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import time
    deadline = time.monotonic() + spec["seconds"]
    for i, path in enumerate(spec["paths"]):
        if time.monotonic() > deadline:
            break
        print(json.dumps({"start": i}), flush=True)
        result = run({"read": "batch", "path": path, "fmt": "cifar10-py", "timeout": 30})
        print(json.dumps({"done": i, **result}), flush=True)
"""


def worker(mode, payload, timeout=300, check=True):
    proc = subprocess.run([sys.executable, "-c", WORKER, ROOT, mode], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"worker died ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def read_in_children(cases, limit_mb=512):
    """{name: result} for {name: case}: each case read by `read_split` (a folder) or
    `read_pickle_batch` (a file) in its own forked child."""
    names = list(cases)
    payload = [{"limit_mb": limit_mb, **cases[n]} for n in names]
    return dict(zip(names, worker("cases", payload)[1]))


def hostile_folder(tmp_path, name, blob, file="data_batch_1"):
    """A genuine small cifar10-py folder with one file replaced by `blob`."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    folder = write_cifar(tmp_path / name, "cifar10-py", {"train": (images, labels),
                                                        "val": (images[:2], labels[:2])},
                         [f"c{i}" for i in range(10)])
    (folder / file).write_bytes(blob)
    return {"read": "split", "path": str(folder), "fmt": "cifar10-py", "split": "train"}


def assert_all_refused(results, file="data_batch_1", kind=DataError):
    """Each case refused with a DataError of `kind`'s family naming the file; nothing crashed,
    raised another exception or read 'OK'."""
    names = {k.__name__ for k in (kind, *_subclasses(kind))}
    bad = {name: r for name, r in results.items()
           if r["outcome"] != "refused" or r["type"] not in names or file not in r["message"]}
    assert not bad, json.dumps(bad, indent=1)


def _subclasses(kind):
    out = []
    for sub in kind.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# ------------------------------------------------------------------ the assembler is faithful

def test_the_assembled_genuine_batch_reads_like_the_real_files(tmp_path):
    """The control for every case below: the same assembler, with honest state, reads clean."""
    blob = record(good_data(3), good_labels(3))
    classic = pickle.loads(blob, encoding="latin1")
    assert np.array_equal(classic["data"], np.frombuffer(pixels(3), np.uint8).reshape(3, -1))
    results = read_in_children({"genuine": hostile_folder(tmp_path, "g", blob)})
    assert results["genuine"]["outcome"] == "ok" and results["genuine"]["canonical"], results


# ------------------------------------------------------------------ one test per class of attack

def test_object_state_numpy_would_trust_is_refused_before_numpy_sees_it(tmp_path):
    """dtype and array state that numpy's __setstate__ applies unchecked. On the reader before
    this test the first three crashed the process (SIGSEGV), the rest read 'OK' as other data."""
    n = 10
    far_field = dct([(s(b"a"), tup(dtype(b"u8"), num(10**9)))])
    cases = {
        # a one-byte structured dtype whose only field lies a gigabyte past its item
        "field_offset": record(good_data(n), array(
            (n,), dtype(b"V1", dtype_state(names=tup(s(b"a")), fields=far_field, elsize=1,
                                           alignment=1)), b"\0" * n)),
        # uint8 given a million-element subarray while keeping its one-byte item
        "subarray": record(good_data(n), array(
            (n,), dtype(b"u1", dtype_state(subarray=tup(dtype(), tup(num(10**6))))), b"\0" * n)),
        # a zero-byte dtype for the array's bytes check, then new state once the array uses it
        "state_after_use": record(good_data(n), array((n,), dtype(b"V0", memo=1), b""),
                                  extra=get(1) + dtype_state(names=tup(s(b"a")), fields=far_field,
                                                             elsize=8, alignment=1) + b"b0"),
        # the same with an integer dtype: given honest state, used, then given the far field
        "state_after_use_u1": record(good_data(n), array((n,), dtype(b"u1", memo=1), b"\0" * n),
                                     extra=get(1) + dtype_state(names=tup(s(b"a")), fields=far_field)
                                     + b"b0"),
        # a dtype given numpy's own state twice
        "dtype_state_twice": record(good_data(n), good_labels(n), extra=s(b"d") + dtype(memo=1)
                                    + get(1) + dtype_state() + b"b0"),
        # Fortran order: the pixels would come out transposed
        "fortran": record(array((n, PIXELS), dtype(), pixels(n), fortran=True), good_labels(n)),
        # an array given its state twice: the second, unchecked state wins in numpy
        "state_twice": record(array((n, PIXELS), dtype(), pixels(n), memo=1), good_labels(n),
                              extra=get(1) + array_state((n, PIXELS), dtype(), pixels(n, 1))
                              + b"b0"),
        # labels as floats, and as big-endian integers: not the plain native integers CIFAR has
        "float_labels": record(good_data(n), array((n,), dtype(b"f8"), b"\0" * 8 * n)),
        "big_endian": record(good_data(n), array((n,), dtype(b"i8", dtype_state(b">")),
                                                 b"\0" * 8 * n)),
        # _reconstruct asked for another shape or type code than numpy writes
        "reconstruct_args": record(
            glob("numpy.core.multiarray", "_reconstruct") + tup(glob("numpy", "ndarray"),
                                                                tup(num(10**6)), s(b"V"))
            + b"R" + array_state((n, PIXELS), dtype(), pixels(n)) + b"b", good_labels(n)),
        # an array never given its state
        "no_state": record(glob("numpy.core.multiarray", "_reconstruct")
                           + tup(glob("numpy", "ndarray"), tup(num(0)), s(b"b")) + b"R",
                           good_labels(n)),
        # an array's bytes as a list (numpy's object-array state), or in three dimensions
        "raw_list": record(array((1, PIXELS), dtype(), raw_op=lst(*[num(0)] * PIXELS)),
                           good_labels(1)),
        # an array's state not numpy's tuple, or its dtype as text
        "state_not_tuple": record(
            glob("numpy.core.multiarray", "_reconstruct") + tup(glob("numpy", "ndarray"),
                                                                tup(num(0)), s(b"b"))
            + b"R" + dct([(s(b"shape"), tup(num(n), num(PIXELS)))]) + b"b", good_labels(n)),
        "dtype_as_text": record(array((n, PIXELS), s(b"u1"), pixels(n)), good_labels(n)),
        "three_dims": record(array((n, 3, 1024), dtype(), pixels(n)), good_labels(n)),
        # state for, or a call to, what is no constructor in a CIFAR file
        "state_on_global": record(glob("numpy", "ndarray") + tup(num(1)) + b"b", good_labels(n)),
        "call_ndarray": record(glob("numpy", "ndarray") + tup(tup(num(n), num(PIXELS))) + b"R",
                               good_labels(n)),
        # numpy.dtype of a field list rather than a type code
        "dtype_list": record(array((n, PIXELS), glob("numpy", "dtype") + tup(
            lst(tup(s(b"a"), s(b"u1"))), num(0), num(1)) + b"R", pixels(n)), good_labels(n)),
        # uint8 given fields (a dtype numpy compares unequal to uint8 but still builds)
        "u1_fields": record(array((n, PIXELS), dtype(b"u1", dtype_state(
            names=tup(s(b"a")), fields=dct([(s(b"a"), tup(dtype(), num(0)))]))), pixels(n)),
            good_labels(n)),
    }
    results = read_in_children({k: hostile_folder(tmp_path, k, v) for k, v in cases.items()})
    assert_all_refused(results, kind=cifar.UnsafePickleError)


def test_arrays_must_be_backed_by_the_files_own_bytes_in_c_order(tmp_path):
    """Arrays whose shape, strides or offsets claim memory the file does not hold."""
    n = 8
    sub = dtype(b"u1", dtype_state(subarray=tup(dtype(), tup(num(PIXELS)))))
    cases = {
        # n bytes in the file claimed as n x 3,072 pixels (a subarray dtype in _frombuffer)
        "subarray_rows": record(frombuffer(b"\x07" * n, sub, (n, PIXELS)), good_labels(n)),
        # _frombuffer reshaped in Fortran order: other strides over the same bytes
        "fortran_reshape": record(frombuffer(pixels(n), dtype(), (n, PIXELS), b"F"),
                                  good_labels(n)),
        # an array of a zero-byte dtype: no bytes at all behind n x 3,072 items
        "zero_itemsize": record(array((n, PIXELS), dtype(b"V0"), b""), good_labels(n)),
        # fewer bytes than the shape needs
        "short_bytes": record(array((n, PIXELS), dtype(), pixels(n)[:-1]), good_labels(n)),
    }
    results = read_in_children({k: hostile_folder(tmp_path, k, v) for k, v in cases.items()})
    assert_all_refused(results, kind=cifar.UnsafePickleError)


def test_row_counts_must_match_the_labels_and_the_shapes_the_format_has(tmp_path):
    n = 6
    cases = {
        # labels an (n, 2) array: len() agrees with the pixels, the split would hold 2n labels
        "labels_2d": record(good_data(n), array((n, 2), dtype(b"i8"), b"\0" * 16 * n)),
        # one label more than there are images
        "labels_count": record(good_data(n), good_labels(n + 1)),
        # labels a 0-d array: no length at all
        "labels_0d": record(good_data(n), array((), dtype(b"i8"), b"\0" * 8)),
        # pixels as a 1-d run of n x 3,072 bytes
        "data_1d": record(array((n * PIXELS,), dtype(), pixels(n)), good_labels(n)),
        # more rows claimed than the file's bytes (the row count is checked against the file)
        "rows_past_file": record(frombuffer(b"\x01" * n, dtype(b"u1", dtype_state(
            subarray=tup(dtype(), tup(num(PIXELS))))), (n, PIXELS)), good_labels(n)),
    }
    results = read_in_children({k: hostile_folder(tmp_path, k, v) for k, v in cases.items()})
    assert_all_refused(results)


def test_allocation_claims_far_beyond_the_file_are_refused_before_anything_is_allocated(tmp_path):
    """A few bytes claiming gigabytes: refused by name, with the reader's memory unchanged
    (each child may grow by 512 MiB at most; more is a MemoryError, which must not happen)."""
    big = 50_000
    cases = {
        # a memo slot 2^26 (the C unpickler sizes its memo to twice the index: 1 GiB)
        "memo_index": hostile_folder(tmp_path, "memo", b"\x80\x02N" + b"r" + struct.pack("<I", 2**26)
                                     + b"0" + record(good_data(1), good_labels(1))[2:]),
        # a 64-bit length prefix claiming a terabyte of bytes
        "bytes8_claim": hostile_folder(tmp_path, "b8", b"\x80\x04\x8e" + struct.pack("<Q", 2**40)
                                       + b"x" * 16 + b"."),
    }
    # one 3,072-byte string memoized and given to 2,000 arrays (6 MB from a 24 kB file), and
    # _codecs.encode called 2,000 times on it
    first = array((1, PIXELS), dtype(), raw_op=s(pixels(1)) + put(2))
    shared = b"](" + first + array((1, PIXELS), dtype(), raw_op=get(2)) * 2000 + b"e"
    cases["shared_bytes"] = hostile_folder(tmp_path, "shared", record(good_data(1), good_labels(1),
                                                                      extra=s(b"x") + shared))
    text = b"X" + struct.pack("<I", PIXELS) + b"a" * PIXELS + b"q\x01"
    encodes = text + b"0" + b"](" + (glob("_codecs", "encode") + b"h\x01" + s(b"latin1")
                                     + b"\x86R") * 2000 + b"e"
    cases["shared_encode"] = hostile_folder(tmp_path, "encode", record(
        good_data(1), good_labels(1), extra=s(b"y") + encodes))
    # six files of ~300 bytes claiming 300,000 images (921 MB; the review measured under 200)
    folder = tmp_path / "six" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in cifar.FILES["cifar10-py"]["train"] + cifar.FILES["cifar10-py"]["val"]:
        blob = record(claim((big, PIXELS)), claim((big,)))
        assert len(blob) < 400
        (folder / name).write_bytes(blob)
    cases["six_small_files"] = {"read": "split", "path": str(folder), "fmt": "cifar10-py",
                                "split": "train"}
    results = read_in_children(cases)
    assert_all_refused(results)
    assert all(r["grew_mb"] < 64 for r in results.values()), results
    assert "memo slot" in results["memo_index"]["message"]


def test_labels_of_the_wrong_type_are_named_errors(tmp_path):
    n = 2
    cases = {
        "none_and_dict": record(good_data(n), lst(b"N", b"}")),
        "huge_int": record(good_data(n), lst(num(10**30), num(0))),
        "text": record(good_data(n), lst(s(b"3"), num(1))),
        "float": record(good_data(n), lst(b"G" + struct.pack(">d", 1.5), num(1))),
        "a_dict": record(good_data(n), dct([(num(0), num(1)), (num(1), num(2))])),
    }
    results = read_in_children({k: hostile_folder(tmp_path, k, v) for k, v in cases.items()})
    assert_all_refused(results)


def test_label_names_must_be_strings(tmp_path):
    # a list nested 100,000 deep among nine names: str() of it raised RecursionError
    deep = b"]" * 100_000 + b"a" * 99_999
    meta = b"\x80\x02" + dct([(s(b"label_names"), lst(deep, *(s(b"c%d" % i) for i in range(9))))]) + b"."
    case = hostile_folder(tmp_path, "deep", meta, file="batches.meta")
    assert_all_refused(read_in_children({"nested_names": case}), file="batches.meta")


def test_the_reader_checks_rows_against_the_file_even_behind_the_unpickler(tmp_path, monkeypatch):
    """The second line, alone: an unpickler that let an unbacked array through (a broadcast view
    of one byte as 50,000 images) still cannot make the reader allocate for it."""
    case = hostile_folder(tmp_path, "f", record(good_data(1), good_labels(1)))
    claim = np.broadcast_to(np.zeros(1, np.uint8), (50_000, PIXELS))
    monkeypatch.setattr(cifar, "safe_load", lambda path: {"data": claim, "labels": [0] * 50_000})
    with pytest.raises(DataError, match="data_batch_1.*more than the file holds"):
        cifar.read_pickle_batch(cifar.Path(case["path"]) / "data_batch_1", "cifar10-py")


def test_the_trainer_names_a_batch_with_wrong_label_types_and_exits_2(tmp_path, capfd):
    from dist_free import train
    case = hostile_folder(tmp_path, "cifar-10-batches-py",
                          record(good_data(2), lst(b"N", b"}")), file="data_batch_2")
    status = train.main(["--config", f"{ROOT}/configs/cifar_demo.yaml", f"data.root={case['path']}",
                         f"run.dir={tmp_path / 'runs'}", "tracking.enabled=false", "eval.holdout=0"])
    err = capfd.readouterr().err
    assert status == 2, err
    assert "data_batch_2" in err and "Traceback" not in err


def test_running_out_of_memory_while_reading_is_a_named_error(tmp_path, monkeypatch):
    images = np.zeros((10, 3, 32, 32), np.uint8)
    folder = write_cifar(tmp_path / "f", "cifar10-bin", {"train": (images, np.arange(10)),
                                                         "val": (images, np.arange(10))},
                         [f"c{i}" for i in range(10)])

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(cifar.np, "concatenate", no_memory)
    with pytest.raises(DataError, match=r"memory.*train|train.*memory"):
        cifar.read_split(folder, "cifar10-bin", "train")


# ------------------------------------------------------------------ fuzzing

INTERESTING = [0, 1, 2, 3, 7, 8, 255, 256, 3071, 3072, 3073, 65535, 2**31 - 1, 2**31, 2**32 - 1]
INT_ARGS = {"BININT1": "<B", "BININT2": "<H", "BININT": "<i", "BINPUT": "<B", "BINGET": "<B",
            "LONG_BINPUT": "<I", "LONG_BINGET": "<I"}


def mutants(blob, count, seed):
    """Seeded random mutations: byte flips, integer arguments set to edge values, opcodes
    deleted, duplicated or moved, and the length prefixes of strings changed."""
    rng = random.Random(seed)
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(blob)]
    bounds = [(name, pos, (ops[i + 1][1] if i + 1 < len(ops) else len(blob)))
              for i, (name, pos) in enumerate(ops)]
    for _ in range(count):
        out = bytearray(blob)
        for _ in range(rng.choice((1, 1, 2, 3))):
            kind = rng.randrange(5)
            name, start, end = rng.choice(bounds)
            if start >= len(out):
                continue
            if kind == 0:
                out[rng.randrange(len(out))] = rng.randrange(256)
            elif kind == 1 and name in INT_ARGS:
                fmt = INT_ARGS[name]
                lo, hi = (-2**31, 2**31 - 1) if fmt == "<i" else (0, 2**(8 * struct.calcsize(fmt)) - 1)
                value = min(max(rng.choice(INTERESTING) + rng.choice((-1, 0, 0, 1)), lo), hi)
                out[start + 1:start + 1 + struct.calcsize(fmt)] = struct.pack(fmt, value)
            elif kind == 1 and name in ("SHORT_BINSTRING", "BINSTRING", "BINUNICODE") \
                    and start + 2 <= len(out):
                out[start + 1] = rng.randrange(256)
            elif kind == 2:
                del out[start:end]
            elif kind == 3:
                out[start:start] = blob[start:end]
            else:
                _, other, other_end = rng.choice(bounds)
                out[start:end] = blob[other:other_end]
        yield bytes(out)


def test_fuzzed_batches_read_clean_or_are_refused_by_name(tmp_path):
    """Seeded mutations of small real-shaped batches (Python 2's cPickle, Python 3's protocols
    2 and 5), read for a few seconds in one capped child: each must read as canonical arrays
    or raise a DataError naming the file; a crash names the mutant that caused it."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, PIXELS), dtype=np.uint8)
    rec = {"batch_label": "training batch 1 of 5", "data": images, "labels": [3, 1, 4],
           "filenames": ["a.png", "b.png", "c.png"]}
    bases = [py2_pickle(as_py2(rec)), pickle.dumps(rec, protocol=2), pickle.dumps(rec, protocol=5),
             record(array((3, PIXELS), dtype(), images.tobytes()), lst(num(3), num(1), num(4)))]
    paths = []
    for k, base in enumerate(bases):
        for i, blob in enumerate(mutants(base, 150, seed=k)):
            path = tmp_path / f"m{k}_{i:03d}" / "data_batch_1"
            path.parent.mkdir()
            path.write_bytes(blob)
            paths.append(str(path))
    random.Random(0).shuffle(paths)
    code, lines = worker("fuzz", {"paths": paths, "seconds": 4, "limit_mb": 512}, timeout=120,
                         check=False)
    done = [r for r in lines if "done" in r]
    started = [r["start"] for r in lines if "start" in r]
    assert code == 0 and len(done) == len(started), \
        f"the reader died (exit {code}) on {paths[started[-1]] if started else 'the first file'}"
    bad = [(paths[r["done"]], r) for r in done
           if not (r["outcome"] == "ok" and r["canonical"])
           and not (r["outcome"] == "refused" and "data_batch_1" in r["message"])]
    assert not bad, bad[:5]
    assert len(done) >= 50, f"only {len(done)} mutants read in the time given"
    outcomes = {r["outcome"] for r in done}
    assert outcomes == {"ok", "refused"}, outcomes     # the mutations neither all harmless nor all fatal


def test_a_pickle_of_many_dict_entries_is_refused_before_the_unpickler_hashes_them():
    """Integer keys that all hash alike cost the C unpickler time quadratic in the file (found by
    the review of issue 27); a CIFAR file's dicts hold a handful of entries."""
    import pickle

    from pipelines.cifar_pickle import MAX_KEYED_ITEMS, UnsafePickleError, scan_globals
    colliding = pickle.dumps({i * (2**61 - 1): None for i in range(MAX_KEYED_ITEMS + 1)}, protocol=2)
    with pytest.raises(UnsafePickleError, match="dict or set entries"):
        scan_globals(colliding, "data_batch_1")
    scan_globals(pickle.dumps({"labels": [1], "data": b"x", "filenames": ["a"], "batch_label": "b"},
                              protocol=2), "data_batch_1")


def test_a_refusal_describes_a_hostile_value_without_its_repr():
    """A list of a million memo references to one string has a repr a million times the file."""
    from pipelines.cifar_pickle import _brief
    shared = "x" * 100_000
    assert _brief([shared] * 1000) == "a list of length 1000"
    assert _brief(2 ** 100_000) == "an int of 100001 bits"
