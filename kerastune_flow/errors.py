"""User errors: each message is one sentence naming what is wrong and what to do.

The CLI turns every `KerastuneFlowError` into that sentence on stderr and exit code 2; the
Python API raises the specific subclass so callers can catch exactly what they expect.
"""


class KerastuneFlowError(Exception):
    """Base class of every error caused by the user's input rather than a bug."""


class ConfigError(KerastuneFlowError, ValueError):
    """A setting, flag or name that cannot be honoured."""


class DataError(KerastuneFlowError, ValueError):
    """A data set or image folder that cannot be read as asked."""


class WeightsError(KerastuneFlowError, OSError):
    """Pre-trained weights that cannot be fetched or do not fit the model."""


class StrategyError(KerastuneFlowError, RuntimeError):
    """A distribution strategy that cannot be set up on this machine."""


class RunDirError(KerastuneFlowError, OSError):
    """A run directory or saved model that cannot be used."""


class MissingPackageError(KerastuneFlowError, ImportError):
    """An optional package (an extra, such as `[export]`) that the command needs is not installed."""


class ExportParityError(KerastuneFlowError, ArithmeticError):
    """An exported model whose outputs do not match the Keras model's; nothing is written."""


class TrainingDivergedError(KerastuneFlowError, ArithmeticError):
    """The loss became NaN or infinite; the last good files are kept."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a batch; finished epochs are kept and the same
    command resumes.

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
