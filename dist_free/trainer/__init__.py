"""The trainer: a run built from a config or restored from its checkpoint (run.py, runtime.py),
the loop (loop.py), in-training evaluation (validation.py), how long and at what lr it trains
(schedule.py), how it stops (stops/) and how it resumes elsewhere (resume/)."""
