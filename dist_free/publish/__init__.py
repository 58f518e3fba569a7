"""Publishing a trained model: reading checkpoints and exports back into a model (load.py), the
model card as data (card.py) and for people (markdown.py), the RobustBench-style model_info.json
(model_info.py), and the export folder (export.py)."""
