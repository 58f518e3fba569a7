"""How a run stops: stop signals (preemption.py), every rank agreeing on the step to stop at
(stop_vote.py), and stops that are final for a job (job_stop.py)."""
