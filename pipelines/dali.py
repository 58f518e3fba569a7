"""DALI train and val pipelines. One code path: ``gpu=True`` decodes with ``device="mixed"``
(nvJPEG, the hardware JPEG decoder where the GPU has one) and runs crop/flip/layout on the GPU;
``gpu=False`` (``device_id=None``) runs the same graph on the CPU.

The file reader is given this rank's shard for the epoch in reading order (``sharding.py`` picks
it), with shuffling off, so DALI and torchvision read exactly the same images. The pipeline is
rebuilt each epoch: it costs well under a second and a pipeline that failed is unusable anyway.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .crash_notes import clear_note, note_in_flight
from .dali_augment import apply_policy
from .errors import DataError
from .loader import Augment, ShardedLoader
from .verify import FATAL, check_file

PREFETCH = 2  # batches DALI decodes ahead; a decode error may belong to any of them
# Batches between two rewrites of the crash note: each is a write and a rename in the run
# directory (a metadata round trip on a network file system), so not one per step. The note
# covers the batches until the next rewrite plus those DALI may be decoding ahead.
NOTE_EVERY = 16
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.float32: types.FLOAT}


def crop_and_layout(images, dtype, channels_last: bool, device: str, mirror=None, crop=None):
    """uint8 HWC -> float in [0,1] (normalisation lives in the model), CHW or HWC."""
    return fn.crop_mirror_normalize(
        images, device=device, dtype=dtype, output_layout="HWC" if channels_last else "CHW",
        crop=crop, crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
        mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0])


@pipeline_def(enable_conditionals=False)
def image_pipeline(files, labels, train: bool, augment: Augment, gpu: bool, dtype,
                   channels_last: bool):
    jpegs, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                     pad_last_batch=True, name="reader")
    decoder, device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    # The hardware decoder (A100/H100) takes this share of each batch; nvJPEG's CUDA path the rest.
    hw = {"hw_decoder_load": 0.65} if gpu else {}
    size = augment.image_size
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB, random_area=[augment.min_area, 1.0],
            random_aspect_ratio=list(augment.aspect), num_attempts=100, **hw)
        images = fn.resize(images, device=device, resize_x=size, resize_y=size)
        images = apply_policy(images, augment.policy, size)   # data.auto_augment, if any
        mirror = fn.random.coin_flip(probability=0.5)
        images = crop_and_layout(images, dtype, channels_last, device, mirror=mirror)
    else:
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **hw)
        images = fn.resize(images, device=device, resize_shorter=augment.val_resize)
        images = crop_and_layout(images, dtype, channels_last, device, crop=(size, size))
    return images, targets.gpu() if gpu else targets


class DaliLoader(ShardedLoader):
    """``kind`` is "dali-gpu" (mixed decoding on ``format.device``) or "dali-cpu"."""

    def __init__(self, *args, gpu: bool, num_threads: int, crash_note: Path | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu, self.num_threads = gpu, num_threads
        self.kind = "dali-gpu" if gpu else "dali-cpu"
        # Where to note the files being decoded (None: nowhere); see crash_notes.py.
        self.crash_note = crash_note

    def build(self, files, labels) -> DALIGenericIterator:
        dtype = DALI_DTYPES.get(self.format.dtype, types.FLOAT)  # others converted afterwards
        device_id = (torch.cuda.current_device() if self.format.device.index is None
                     else self.format.device.index) if self.gpu else None
        pipe = image_pipeline(
            [str(f) for f in files], list(labels), self.split == "train", self.augment, self.gpu,
            dtype, self.format.channels_last, batch_size=self.batch_size,
            num_threads=self.num_threads, device_id=device_id, seed=self.augment_seed(),
            prefetch_queue_depth=PREFETCH, enable_conditionals=self.augment.policy is not None)
        # prepare_first_batch=False: otherwise a bad first file fails inside the constructor.
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=False)

    def batches(self, files, labels):
        if not files:
            return
        done = 0
        window = (NOTE_EVERY + PREFETCH + 2) * self.batch_size
        try:
            note_in_flight(self.crash_note, files[:window])
            for out in self.build(files, labels):
                images = out[0]["images"]
                if self.format.channels_last:  # DALI gave NHWC; this view is NCHW channels_last
                    images = images.permute(0, 3, 1, 2)
                done += 1
                if done % NOTE_EVERY == 0:
                    note_in_flight(self.crash_note, files[done * self.batch_size:][:window])
                yield images, out[0]["labels"]
        except RuntimeError as err:
            raise self.explain(err, files, done) from err
        finally:
            clear_note(self.crash_note)

    def explain(self, err: RuntimeError, files, done: int) -> DataError:
        """DALI's decode errors name no file; find the culprit among the batches in flight."""
        start = done * self.batch_size
        window = files[start:start + (PREFETCH + 2) * self.batch_size]
        bad = [p for p in map(check_file, window) if p is not None and p.kind in FATAL]
        where = "; ".join(str(p) for p in bad) if bad else (
            f"no bad file found among {window[0] if window else '?'} and the "
            f"{len(window) - 1} files after it")
        return DataError(f"DALI failed while reading batch {done} of rank {self.rank} "
                         f"({first_line(err)}): {where}. "
                         "Run `python -m dist_free.data verify ROOT` to list every bad file.")


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
