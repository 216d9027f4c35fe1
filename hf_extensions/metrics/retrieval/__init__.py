"""Local `evaluate` module folder: load `retrieval.py` with `evaluate.load(<path>)`."""
