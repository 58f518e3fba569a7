"""CIFAR-10/100 as distributed: both python and binary versions, files shaped like the real ones
(Python 2 cPickle, protocol 2) and files today's numpy writes; hostile pickles refused unrun."""

import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from pipelines import DataError, cifar
from pipelines.cifar import UnsafePickleError, find, read_split, safe_load
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


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": RunsCode(marker)}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"(posix|os|nt)\.system"):
        safe_load(path)
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


@pytest.mark.parametrize("evil", [
    (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.", "_codecs"),
    (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
    (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.", "Python objects"),
    (b"(S'true'\nios\nsystem\n.", "INST"),            # protocol 0's INST builds from a name
])
def test_allowed_names_put_to_other_uses_are_refused(tmp_path, evil):
    blob, named = evil
    path = tmp_path / "f"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match=named):
        safe_load(path)


def test_a_computed_global_name_cannot_slip_past_the_scan():
    # STACK_GLOBAL whose module name comes from a string built at load time (a REDUCE result).
    blob = (b"\x80\x04" + b"\x8c\x03str\x94"          # push "str", memoize
            + b"\x8c\x08builtins\x94\x8c\x03str\x94\x93\x94"   # builtins.str (refused anyway)
            + b".")
    with pytest.raises(UnsafePickleError):
        cifar.scan_globals(blob, "x")


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
