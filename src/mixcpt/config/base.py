"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section: an unknown key or a wrong type is a validation error naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
