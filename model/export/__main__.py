"""python -m model.export CHECKPOINT OUT.onnx | --triton-repository DIR (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
