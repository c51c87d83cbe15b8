"""The TensorBoard logger's name in configs written before :mod:`atheria_lightning.loggers` held it.

A user's own ``--config`` file that lists ``atheria_lightning.scalars.BufferedTensorBoardLogger`` beside W&B (as the
GUIDE showed) keeps working: this is that name, the class itself lives in :mod:`atheria_lightning.loggers`.
"""

from atheria_lightning.loggers.tensorboard import BufferedTensorBoardLogger

__all__ = ["BufferedTensorBoardLogger"]
