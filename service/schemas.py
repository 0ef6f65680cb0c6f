"""The API's request and response bodies (they make up the OpenAPI schema at /openapi.json and /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Crops = Literal["center", "ten"]


class Problem(BaseModel):
    """RFC 9457 problem details: every error answer has this body, media type application/problem+json."""

    type: str = Field(description="urn:alexnet:problem:<slug> for this API's errors, about:blank otherwise")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what was wrong, in words")


class Prediction(BaseModel):
    rank: int = Field(description="1 for the most probable class")
    index: int = Field(description="class index (position of the wnid in sorted order)")
    wnid: str = Field(description="WordNet id, e.g. n02123045")
    label: str = Field(description="the class's first name, e.g. 'tabby'")
    score: float = Field(description="softmax probability (the mean over crops when crops=ten)")


class ImageResult(BaseModel):
    filename: str | None = Field(description="the upload's filename, when the client sent one")
    predictions: list[Prediction] = Field(description="top_k classes, most probable first")


class ModelIdentity(BaseModel):
    """Which weights answered, and how good they are. ``trained`` says where the weights came from (training
    or an import, not a fresh initialisation); ``val_top1_error`` and ``val_top5_error`` say how good: a
    checkpoint of a first epoch is ``trained`` and may still be at chance level."""

    checkpoint: str | None = Field(description="checkpoint file name; null for the untrained fallback net")
    path: str | None = Field(description="where the checkpoint was loaded from")
    sha256: str | None = Field(description="sha256 of the checkpoint file")
    format_version: int | None = Field(description="checkpoint format version")
    trained: bool = Field(
        description=(
            "where the weights came from, not how good they are: true when the checkpoint records that they "
            "were trained — written by `python -m training train` (after any epoch, the first included) or by "
            "`python -m model.import_weights` (published weights); false for the freshly initialised net served "
            "when there is no checkpoint (its labels are noise), or a checkpoint that does not record it. How "
            "good trained weights are: val_top1_error and val_top5_error (chance level is 1 - 1/classes, "
            "0.999 and 0.995 for 1000 classes)"
        )
    )
    epoch: int | None = Field(None, description="training epoch the weights come from; null: not recorded")
    val_top1_error: float | None = Field(
        None,
        description=(
            "fraction of validation images whose most probable class is wrong (centre crop), as recorded in the "
            "checkpoint: by training, on its validation split after `epoch`; by an import, the publisher's "
            "figure. Null: not recorded (the untrained net; imported weights not matching a published checksum)"
        ),
    )
    val_top5_error: float | None = Field(
        None, description="likewise, the fraction whose true class is not among the 5 most probable"
    )


class Timing(BaseModel):
    total_ms: float = Field(description="from the request's arrival to the response")
    preprocess_ms: float = Field(description="decoding and resizing the images")
    inference_ms: float = Field(description="waiting for a batch slot plus the forward pass")


class ClassifyResponse(BaseModel):
    model: ModelIdentity
    crops: Crops
    top_k: int
    results: list[ImageResult] = Field(description="one entry per uploaded image, in upload order")
    timing: Timing


class ModelInfo(BaseModel):
    model: ModelIdentity
    num_classes: int
    devices: list[str] = Field(description="where the net runs: one device, or one per tower")
    loaded_at: str = Field(description="when this model started serving (UTC, ISO 8601)")
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    provenance: dict[str, Any]
    training: dict[str, Any] | None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelIdentity
