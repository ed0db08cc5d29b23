"""Config fields with a fixed set of values (no omegaconf needed: the model config uses it too)."""

from enum import Enum


class Choice(str, Enum):
    """A field with a fixed set of values. OmegaConf refuses any other value, naming the key and
    the allowed values; members compare equal to their strings and print as them (names equal
    values), so YAML, MLflow parameters and cache keys see plain strings."""

    def __str__(self) -> str:
        return self.value
