"""Benchmarks: `python -m dist_free.bench` measures what free training costs on this machine.

Modules: suite (the CLI, its parts and configuration), timing (interleaved timing, step and
update costs, the copy-bandwidth reference), pipeline (decode throughput, end to end on JPEGs),
workers (child processes: peak memory, DDP scaling; worker_main is what a child runs), report
(Markdown tables, RESULTS.md), reference and algorithm1 (the authors' loop and the paper's
Algorithm 1, restated: one to compare speeds with, one to check the trainer against).
"""
