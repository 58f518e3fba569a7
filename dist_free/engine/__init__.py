"""The engine: free training (Algorithm 1) and its baselines, the L-inf attacks, the optimizers,
the EMA and the architectures. Tensors in, tensors out: it knows nothing of the config file, the
input pipelines, MLflow or DALI (tests/project/test_layout.py holds it to that)."""
