"""Classify settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.classifier import DEFAULT_FLIP_TTA, DEFAULT_ZOOM_TTA
from shared.model_bundle import DEFAULT_BUNDLE, MAX_ZOOM_VIEWS, ZOOM_RANGE
from shared.settings import Section, ServiceSettings
from shared.tracking import TrackerSettings


class ClassifyOptions(Section):
    group: str = Field("classify", min_length=1, description="consumer group on the faces stream")
    model: Path = Field(DEFAULT_BUNDLE, description="model bundle folder (model.json + weights)")
    runtime: Literal["auto", "litert", "litert-int8", "tensorflow"] = Field(
        "auto", description="inference runtime (litert-int8: the bundle's int8 model, faster, slightly less accurate)")
    flip_tta: bool = Field(DEFAULT_FLIP_TTA, description="average each face with its mirror image (2x model time)")
    zoom_tta: list[Annotated[float, Field(ge=ZOOM_RANGE[0], le=ZOOM_RANGE[1])]] | None = Field(
        None, max_length=MAX_ZOOM_VIEWS,
        description="also average views zoomed by these factors about the crop's centre (each costs one more "
                    "model pass, two with flip_tta); [] = off; null = the views the bundle names (model.json "
                    "zoom_tta), else " + ", ".join(map(str, DEFAULT_ZOOM_TTA)))
    threads: int = Field(1, ge=0, le=64, description="inference threads (0 = runtime default)")
    max_batch: int = Field(64, ge=1, le=1024, description="run the model once this many faces wait")
    max_wait_ms: int = Field(20, ge=0, le=10_000, description="... or once the oldest waiting face is this old")
    eager: bool = Field(True, description="run the model as soon as the faces stream has nothing more queued "
                                          "(batches then grow only under load); false: wait for max_batch or "
                                          "max_wait_ms")
    events_maxlen: int = Field(100_000, ge=100, description="approximate cap of the events stream")
    publish_live: bool = Field(True, description="also PUBLISH each event on the live pub/sub channel")


class ClassifySettings(ServiceSettings):
    classify: ClassifyOptions = ClassifyOptions()
    tracking: TrackerSettings = TrackerSettings()

    @model_validator(mode="after")
    def _claim_after_batch_wait(self) -> ClassifySettings:
        # Faces wait up to max_wait_ms in a batch while pending: a shorter claim_idle_ms would
        # let another replica take them over mid-batch and classify them twice.
        if self.streams.claim_idle_ms <= 2 * self.classify.max_wait_ms + 100:
            raise ValueError(f"streams.claim_idle_ms ({self.streams.claim_idle_ms}) must exceed twice "
                             f"classify.max_wait_ms ({self.classify.max_wait_ms}) plus 100 ms")
        return self
