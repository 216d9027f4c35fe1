"""Local `evaluate` module folder: load `nll.py` with `evaluate.load(<path>)`."""
