"""The curation request: the `curate` deployment's form (Prefect UI) and the flow's input, one pydantic model.

An optional field's schema is a plain `{"type": "string"}` without a default (`plain`): the form shows a text
input (not a str/None toggle with "Property is type None"), and Prefect's parameter check, which makes a
non-required field without a default nullable, accepts `null` for it (issue 22 item 4). Which fields an action
needs is checked here, in one sentence naming the field, before anything runs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conveyor.training.request import _known_stores

Action = Literal["drop", "undrop", "trim", "retask", "rename"]


def plain(schema: dict) -> None:
    """An optional text field as a plain input that still takes null (see the module docstring)."""
    schema.pop("anyOf", None)
    schema.pop("default", None)
    schema["type"] = "string"


class CurateRequest(BaseModel):
    """What to change in a store; every change is one commit, a new dataset version (the old ones stay)."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(title="Store", json_schema_extra=_known_stores,
                       description="The store to curate: its name (a folder under store_root, e.g. `koch_grasp`).")
    action: Action = Field(
        "drop", title="Action",
        description="drop: take episodes out (a dropped source episode is never re-ingested until undropped). "
                    "undrop: bring dropped episodes back (by drop id, as `conveyor show` lists them). trim: keep "
                    "frames Start to End-1 of one episode. retask: set the task text of episodes. rename: rename "
                    "the task Old task to Task everywhere.")
    episodes: str | None = Field(
        None, title="Episodes", json_schema_extra=plain, examples=["3 7 12-15"],
        description="Store episode indices and ranges as `conveyor show` numbers them, e.g. `3 7 12-15` (undrop: "
                    "drop ids; trim: one episode). Not used by rename.")
    reason: str | None = Field(None, title="Reason", json_schema_extra=plain,
                               description="Why, kept in the store's history (`conveyor show`). Required to drop.")
    task: str | None = Field(None, title="Task", json_schema_extra=plain,
                             description="retask: the new task text. rename: the new name of the task.")
    old_task: str | None = Field(None, title="Old task", json_schema_extra=plain,
                                 description="rename: the task text to rename.")
    start: str | None = Field(None, title="Start", json_schema_extra=plain, examples=["30", "1.5s"],
                              description="trim: first frame kept, a frame number or seconds (`1.5s`).")
    end: str | None = Field(None, title="End", json_schema_extra=plain, examples=["120", "4s"],
                            description="trim: the frame after the last one kept, a frame number or seconds.")

    @field_validator("episodes", "reason", "task", "old_task", "start", "end", mode="before")
    @classmethod
    def _blank_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v  # an input cleared in the UI form

    @model_validator(mode="after")
    def _needs(self) -> "CurateRequest":
        need = {"drop": ("episodes", "reason"), "undrop": ("episodes",), "trim": ("episodes", "start", "end"),
                "retask": ("episodes", "task"), "rename": ("old_task", "task")}[self.action]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.action} needs {' and '.join(type(self).model_fields[f].title for f in missing)}")
        if self.episodes is not None:
            from conveyor.curate import parse_episodes

            picked = parse_episodes(self.episodes)  # ValueError names the bad word
            if self.action == "trim" and len(picked) != 1:
                raise ValueError(f"trim takes one episode, not {self.episodes!r}")
        return self

    def episode_list(self) -> list[int]:
        from conveyor.curate import parse_episodes

        return parse_episodes(self.episodes or "")
