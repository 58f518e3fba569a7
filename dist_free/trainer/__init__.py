"""The trainer: a run built from a config or restored from its checkpoint (run.py, runtime.py),
the loop (loop.py), in-training evaluation (validation.py), at what lr it trains (schedule.py;
how long is Config.real_epochs), how it stops (stops/) and how it resumes elsewhere (resume/)."""
