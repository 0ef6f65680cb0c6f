"""Helpers shared by the tests (no tests here), imported as ``support.<module>`` (tests/ is on sys.path:
tests/conftest.py).

- ``support.service``: a real server process (``ServiceProcess``; ``LiveServices``, the factory behind the
  ``live_service`` fixtures), small checkpoints (``write_checkpoint``), the model package's own answers
  (``Direct``), problem+json and metrics checks, hostile requests.
- ``support.corpus``: the hostile-input corpus (tests/corpus/make_corpus.py) written out, and its requests.
- ``support.training``: tiny ImageNet-layout datasets, ``prepare`` and ``train`` run quietly in-process.
- ``support.weights``: Caffe and ONNX files of random AlexNet weights, and their reference logits.
- ``support/train_with_hooks.py``: a script, ``python -m training train`` with a crash or a NaN injected.
"""
