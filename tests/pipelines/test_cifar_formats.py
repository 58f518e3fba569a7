"""CIFAR-10/100 as distributed: both python and binary versions, files shaped like the real ones
(Python 2 cPickle, protocol 2) and files today's numpy writes; hostile pickles refused unrun."""

import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from pipelines import DataError, cifar
from pipelines.cifar import PIXELS, UnsafePickleError, find, read_split, safe_load
from pipelines.cifar_write import as_py2, py2_pickle, write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def arrays(n, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, classes, n).astype(np.int64))


def names_for(fmt):
    return [f"class{i}" for i in range(10 if fmt.startswith("cifar10-") else 100)]


# The python formats in both pickle styles (Python 2's cPickle, today's numpy); the binary
# formats have no pickle, so one style.
CASES = [(fmt, style) for fmt in cifar.FORMATS
         for style in (("py2",) if fmt.endswith("-bin") else ("py2", "numpy"))]


@pytest.mark.parametrize("fmt,style", CASES)
def test_every_format_reads_back_the_pixels_labels_names_it_was_written_with(tmp_path, fmt, style):
    classes = len(names_for(fmt))
    train, val = arrays(25, classes, 1), arrays(7, classes, 2)
    folder = write_cifar(tmp_path / fmt, fmt, {"train": train, "val": val}, names_for(fmt), style)
    assert find(folder) == (folder, fmt)                  # recognised from its files
    for split, (images, labels) in (("train", train), ("val", val)):
        got = read_split(folder, fmt, split)
        assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)
        assert got.class_names == tuple(names_for(fmt))


def test_the_python_2_shaped_file_is_what_cpickle_wrote_readable_by_stdlib_pickle(tmp_path):
    """The distributed files name numpy.core.multiarray._reconstruct in GLOBAL opcodes and hold
    Python 2 str records: the reader must accept exactly that, not just what numpy writes today."""
    images, labels = arrays(3, 10)
    blob = py2_pickle(as_py2({"data": images.reshape(3, -1), "labels": labels.tolist(),
                              "batch_label": "training batch 1 of 5"}))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]
    assert ("PROTO", 2) in ops
    assert {a for o, a in ops if o == "GLOBAL"} == {"numpy.core.multiarray _reconstruct",
                                                    "numpy ndarray", "numpy dtype"}
    assert not {o for o, _ in ops} & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES"}
    classic = pickle.loads(blob, encoding="bytes")        # how CIFAR's own page says to read it
    assert np.array_equal(classic[b"data"], images.reshape(3, -1))
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    assert np.array_equal(safe_load(path)["data"], images.reshape(3, -1))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python_3s_own_pickles_of_a_batch_read_exactly_as_pickle_reads_them(tmp_path, protocol):
    """What `pickle.load` gives (numpy's own unpickling) is what the restricted reader gives:
    the same values, dtype, shape, order and writability; integer label arrays too."""
    images, labels = arrays(4, 10)
    rec = {"data": images.reshape(4, -1), "labels": labels.tolist(), "batch_label": "b 1",
           "ints": labels.astype(np.int32), "u8": labels.astype(np.uint64)}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(rec, protocol=protocol))
    want, got = pickle.loads(path.read_bytes()), safe_load(path)
    assert want.keys() == got.keys() and want["labels"] == got["labels"]
    for key in ("data", "ints", "u8"):
        w, g = want[key], got[key]
        assert (g.dtype, g.shape, g.flags.c_contiguous, g.flags.writeable) == \
            (w.dtype, w.shape, w.flags.c_contiguous, w.flags.writeable)
        assert np.array_equal(g, w)
    data, read_labels = cifar.read_pickle_batch(path, "cifar10-py")
    assert np.array_equal(data, images.reshape(4, -1)) and read_labels.dtype == np.int64
    assert np.array_equal(read_labels, labels)


@pytest.mark.parametrize("style", ["py2", 4, 5])   # protocol 2 pickles b"" as __builtin__.bytes()
def test_an_empty_batch_reads_as_empty_arrays(tmp_path, style):
    rec = {"data": np.zeros((0, PIXELS), np.uint8), "labels": []}
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_pickle(as_py2(rec)) if style == "py2" else pickle.dumps(rec, protocol=style))
    data, labels = cifar.read_pickle_batch(path, "cifar10-py")
    assert data.shape == (0, PIXELS) and data.dtype == np.uint8 and labels.shape == (0,)


def test_a_protocol_2_pickle_from_python_3_using_codecs_encode_is_accepted(tmp_path):
    images, _ = arrays(2, 10)
    blob = pickle.dumps({"data": images.reshape(2, -1), "labels": [1, 2]}, protocol=2)
    assert "_codecs encode" in {a for op, a, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    path = tmp_path / "p2"
    path.write_bytes(blob)
    assert np.array_equal(safe_load(path)["data"], images.reshape(2, -1))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def each_line_refuses(blob, path, match, lines=("scan", "unpickler")):
    """Each named line of defence refuses `blob` on its own (so that removing either check fails
    a test), and safe_load, which runs both, refuses it too. A line not named must let it by."""
    scan = lambda: cifar.scan_globals(blob, path)                          # noqa: E731
    unpickle = lambda: cifar.RestrictedUnpickler(io.BytesIO(blob), path).load()   # noqa: E731
    for line, run in (("scan", scan), ("unpickler", unpickle)):
        if line in lines:
            with pytest.raises(UnsafePickleError, match=match):
                run()
        elif line == "scan":
            run()
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match=match):
        safe_load(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    blob = pickle.dumps({"data": RunsCode(marker)}, protocol=protocol)
    # GLOBAL at protocols 0 and 2, STACK_GLOBAL at 4 and 5: the opcode scan and the unpickler's
    # find_class each refuse it without the other.
    assert {op.name for op, _, _ in pickletools.genops(blob)} & {"GLOBAL", "STACK_GLOBAL"} == \
        {"GLOBAL" if protocol < 4 else "STACK_GLOBAL"}
    each_line_refuses(blob, path, r"(posix|os|nt)\.system")
    assert not marker.exists()
    pickle.loads(path.read_bytes())      # the control: an ordinary unpickler does run it
    assert marker.exists()


def test_the_trainer_refuses_a_hostile_cifar_folder_with_exit_2_running_nothing(tmp_path,
                                                                               capfd):
    from dist_free import train
    images, labels = arrays(40, 10)
    folder = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10-py",
                         {"train": (images, labels), "val": (images[:8], labels[:8])},
                         names_for("cifar10-py"))
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": RunsCode(marker)}, protocol=2))
    status = train.main(["--config", f"{ROOT}/configs/cifar_demo.yaml", f"data.root={tmp_path}",
                         f"run.dir={tmp_path / 'runs'}", "tracking.enabled=false",
                         "eval.holdout=0"])
    err = capfd.readouterr().err
    assert status == 2
    assert "system" in err and "data_batch_3" in err and "refused" in err
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("blob,named,lines", [
    # allowed names, refused by the unpickler's checks of their arguments (the scan lets them by)
    (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.", "_codecs",
     ("unpickler",)),
    (b"\x80\x02c_codecs\nencode\nC\x01xX\x06\x00\x00\x00latin1\x86R.", "_codecs.encode",
     ("unpickler",)),
    (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.", "Python objects", ("unpickler",)),
    # names outside the allow-list, and opcodes that build or fetch objects without one
    (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval", ("scan", "unpickler")),
    (b"(S'true'\nios\nsystem\n.", "INST|os.system", ("scan", "unpickler")),   # protocol 0's INST
    (b"Pfoo\n.", "PERSID|persistent", ("scan", "unpickler")),
], ids=["codecs-base64", "codecs-of-bytes", "dtype-object", "eval", "inst", "persid"])
def test_allowed_names_put_to_other_uses_are_refused(tmp_path, blob, named, lines):
    each_line_refuses(blob, tmp_path / "f", named, lines)


def test_a_computed_global_name_cannot_slip_past_the_scan():
    # STACK_GLOBAL whose module name is a REDUCE result (_codecs.encode("os", "latin1"), memoized
    # and fetched back): the scan cannot know it from the opcodes, and says so.
    blob = (b"\x80\x04" + b"\x8c\x07_codecs\x94\x8c\x06encode\x94\x93"
            + b"\x8c\x02os\x8c\x06latin1\x86R\x94"
            + b"h\x02\x8c\x06system\x93.")
    with pytest.raises(UnsafePickleError, match="computed value"):
        cifar.scan_globals(blob, "x")
    # ... whereas two strings the scan can read are checked by name, through the memo too
    with pytest.raises(UnsafePickleError, match=r"names os\.system"):
        cifar.scan_globals(b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93.", "x")


def test_damaged_files_are_named_errors_not_tracebacks(tmp_path):
    images, labels = arrays(10, 10)
    folder = write_cifar(tmp_path / "bin", "cifar10-bin",
                         {"train": (images, labels), "val": (images, labels)}, names_for("cifar10-bin"))
    with open(folder / "data_batch_2.bin", "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(DataError, match=r"data_batch_2.bin.*3073-byte records"):
        read_split(folder, "cifar10-bin", "train")
    py = write_cifar(tmp_path / "py", "cifar10-py",
                     {"train": (images, labels), "val": (images, labels)}, names_for("cifar10-py"))
    (py / "test_batch").write_bytes((py / "test_batch").read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch"):
        read_split(py, "cifar10-py", "val")


def test_the_root_may_hold_the_distributed_folder_whose_named_format_must_be_there(tmp_path):
    images, labels = arrays(10, 100)
    folder = write_cifar(tmp_path / "cifar-100-binary", "cifar100-bin",
                         {"train": (images, labels), "val": (images, labels)},
                         names_for("cifar100-bin"))
    assert find(tmp_path) == (folder, "cifar100-bin")
    assert find(tmp_path, "imagefolder") is None
    with pytest.raises(DataError, match="data.format=cifar10-py"):
        find(tmp_path, "cifar10-py")


def test_the_binary_cifar_100_record_trains_on_the_fine_label(tmp_path):
    images, labels = arrays(6, 100)
    folder = write_cifar(tmp_path / "b", "cifar100-bin", {"train": (images, labels),
                                                          "val": (images, labels)},
                         names_for("cifar100-bin"))
    raw = np.fromfile(folder / "train.bin", dtype=np.uint8).reshape(6, 3074)
    assert np.array_equal(raw[:, 1], labels) and np.array_equal(raw[:, 0], labels // 5)
    assert np.array_equal(read_split(folder, "cifar100-bin", "train").labels, labels)


def test_safe_load_accepts_only_what_it_returns_from_memory(tmp_path):
    # The unpickler itself re-checks every global (a second line behind the opcode scan).
    images, _ = arrays(1, 10)
    blob = py2_pickle(as_py2({"data": images.reshape(1, -1)}))
    unpickler = cifar.RestrictedUnpickler(io.BytesIO(blob), "mem")
    assert unpickler.load()["data"].shape == (1, 3072)
    with pytest.raises(UnsafePickleError):
        unpickler.find_class("os", "system")
