"""Training the 2012 AlexNet: dataset preparation, the paper's recipe, evaluation.

    python -m training prepare SRC DEST      decode once → uint8 256×256 arrays + mean image + colour PCA
    python -m training train DEST --out DIR  SGD, augmentation, lr ÷ 10 on plateaus; resumable; DDP-ready
    python -m training evaluate CKPT DEST    top-1 / top-5 error, centre crop and 10 patches

Depends on ``model`` only (network, checkpoint format, the shared preprocessing).
"""

# The functions live in their modules (training.prepare.prepare, training.train.train,
# training.evaluate.evaluate / run_evaluate); re-exporting them here would hide those modules.
from .data import PreparedDataset
from .errors import TrainingError
from .hyperparameters import Hyperparameters
from .run import Options

__all__ = ["Hyperparameters", "Options", "PreparedDataset", "TrainingError"]
