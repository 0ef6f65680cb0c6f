"""Inference over a folder: classify image files with a checkpoint, into JSON lines or CSV, resumably.

``python -m training predict CHECKPOINT SOURCE... --output OUT`` runs it (``--help`` for the options).
Each file goes through the checkpoint's own preprocessing, decoded in worker processes (decoding.py).
The main process batches them through the net (classifier.py) and appends one record a file (records.py).
A rerun skips the files OUT already holds. Ground truth, when known, adds top-1 and top-5 error.
docs/training-formats.md describes OUT, its summary and the features files. Depends on ``model`` only.
"""
