"""The decoder's crash note costs a file write and rename in the run directory (a metadata round
trip on a network file system): a few per epoch, not one per batch, and still covering every
batch DALI may be decoding when it dies."""

import pipelines.dali as dali
from pipelines import build_loader


def test_the_crash_note_is_rewritten_only_every_few_batches_covering_what_is_in_flight(
        demo_root, tmp_path, monkeypatch):
    notes = []
    monkeypatch.setattr(dali, "note_in_flight", lambda note, files: notes.append(list(files)))
    loader = build_loader("dali-cpu", demo_root, "val", batch_size=8, image_size=32,
                          val_resize=36, crash_note=tmp_path / "note.json")
    files = [loader.listing.files[i] for i in loader.shard()]
    seen = 0
    for _ in loader:
        seen += 1
        # The note written last covers this batch and the prefetched ones after it.
        assert set(map(str, files[seen * 8:(seen + dali.PREFETCH + 1) * 8])) <= \
            set(map(str, notes[-1]))
    assert seen == len(loader) > 2 * dali.NOTE_EVERY
    assert len(notes) == 1 + seen // dali.NOTE_EVERY
