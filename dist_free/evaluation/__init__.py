"""Robust evaluation: clean, PGD and AutoAttack accuracy with exact sharded counts, the
gradient-masking verdict, and the evaluation report (its schema, protocol text and tables)."""
