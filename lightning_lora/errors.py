"""Errors lightning-lora raises. Each also subclasses the builtin a caller would catch anyway
(``ValueError`` for bad input, ``RuntimeError`` for a call in the wrong state), so code written
against plain Python keeps working, while ``except LoRAError`` catches all of ours."""


class LoRAError(Exception):
    """Base class of every error raised by lightning-lora."""


class LoRAConfigError(LoRAError, ValueError):
    """A config field has a bad value or an unknown name."""


class LoRATargetError(LoRAError, ValueError):
    """A module pattern matches nothing, or matches a layer type LoRA cannot adapt."""


class LoRAStateError(LoRAError, RuntimeError):
    """An operation does not fit the model's LoRA state (inject twice, merge twice, ...)."""


class AdapterFileError(LoRAError, ValueError):
    """An adapter file is missing, corrupt, or does not fit the model it is loaded into."""


class AdapterSaveError(LoRAError, OSError):
    """An adapter cannot be saved where asked: the place is not writable, or holds an adapter
    that saving would replace."""


class CheckpointError(LoRAError, ValueError):
    """A checkpoint holds something other than tensors and plain data (a pickle that could run
    code), so it is not loaded."""
