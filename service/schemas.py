"""The API's request and response bodies (they make up the OpenAPI schema at /openapi.json and /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from model import imagenet_classes
from model.preprocessing import Crops

# The classes a schema can name: ImageNet's (a checkpoint may bring others; GET /model lists them).
IMAGENET_WNIDS = tuple(c.wnid for c in imagenet_classes())

FeatureLayer = Literal["fc6", "fc7"]  # model.network.FEATURE_LAYERS
ExplainFormat = Literal["png", "json"]


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


class EmbedParams(BaseModel):
    """The query of POST /embed."""

    layer: FeatureLayer = Field(
        "fc7",
        description="the hidden layer whose activations (after its ReLU) are returned: fc6 or fc7 (4096 "
        "numbers each at full width, both towers' halves side by side). The paper's Fig. 4 finds similar "
        "images by the Euclidean distance between their fc7 vectors",
    )
    normalize: bool = Field(False, description="scale each vector to unit L2 norm (an all-zero vector stays zero)")
    crops: Literal["center"] = Field(
        "center", description="center only: the features of the centre 224×224 crop (no ten-crop average)"
    )


class EmbeddedImage(BaseModel):
    filename: str | None = Field(description="the upload's filename, when the client sent one")
    features: list[float] = Field(description="`dimension` float32 activations (exact float32 values)")


class EmbedResponse(BaseModel):
    model: ModelIdentity
    layer: FeatureLayer
    normalize: bool
    crops: Literal["center"]
    dimension: int = Field(description="length of every features vector (4096 for the paper's net)")
    results: list[EmbeddedImage] = Field(description="one entry per uploaded image, in upload order")
    timing: Timing


class ExplainParams(BaseModel):
    """The query of POST /explain. The class explained: ``class_index`` or ``wnid`` (at most one), else the
    most probable class of the centre crop."""

    class_index: int | None = Field(
        None,
        ge=0,
        le=len(IMAGENET_WNIDS) - 1,
        description="explain this class (its index in sorted wnid order, 0..number of classes - 1)",
    )
    wnid: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="explain the class with this WordNet id, e.g. n02123045: one of the model's classes (the "
        "schema lists ImageNet's; a checkpoint with other classes lists its own at GET /model)",
        json_schema_extra={"enum": list(IMAGENET_WNIDS)},
    )
    format: ExplainFormat = Field(
        "png",
        description="png: the heat map over the centre crop the net saw (image/png, crop × crop pixels); json: "
        "the map itself, with the class",
    )

    @model_validator(mode="after")
    def _one_class(self):
        if self.class_index is not None and self.wnid is not None:
            raise PydanticCustomError("one_class", "give class_index or wnid, not both")
        return self


class ExplainedClass(BaseModel):
    index: int = Field(description="class index (position of the wnid in sorted order)")
    wnid: str = Field(description="WordNet id, e.g. n02123045")
    label: str = Field(description="the class's first name, e.g. 'tabby'")
    probability: float = Field(description="its softmax probability for the centre crop")


class ExplainResponse(BaseModel):
    model: ModelIdentity
    explained: ExplainedClass = Field(description="the class whose evidence the map shows")
    size: int = Field(description="the map's height and width in pixels: the crop size, 224")
    heatmap: list[list[float]] = Field(
        description="Grad-CAM on conv5 (after its ReLU), upsampled to the crop: `size` rows of `size` values in "
        "[0, 1] (1: the strongest evidence for the class), rounded to 3 decimals; row 0 is the top of the crop"
    )
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


# The Open Inference Protocol (KServe v2 / Triton HTTP/REST) under /v2 -------------------------------------
# Field names and shapes are the protocol's; "parameters" values are strings, numbers or booleans.

ProtocolParameters = dict[str, str | int | float | bool]


class ProtocolError(BaseModel):
    """Every failure under /v2 has this body (the protocol's error object), media type application/json."""

    error: str = Field(description="what was wrong, in words")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="classification, binary_tensor_data")


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="BYTES, FP32, …")
    shape: list[int] = Field(description="-1: any size (the batch dimension)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="alternatives: a request sends exactly one of them")
    outputs: list[TensorMetadata]
    parameters: ProtocolParameters = Field(
        description="not in the protocol (clients ignore it): how an FP32 'input' must be preprocessed"
    )


class _Strict(BaseModel):
    # The JSON as the protocol writes it: no "3" for 3, no 1.0 for a shape's 1.
    model_config = ConfigDict(strict=True)


class RequestInput(_Strict):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: ProtocolParameters | None = Field(
        None, description="binary_data_size: the tensor's bytes follow the JSON (binary tensor data extension)"
    )
    data: list[Any] | None = Field(
        None, description="the elements, flat or nested, row-major (BYTES: one UTF-8 string each)"
    )


class RequestOutput(_Strict):
    name: str
    parameters: ProtocolParameters | None = Field(
        None, description="binary_data: true (raw bytes after the JSON); classification: k (top-k strings)"
    )


class InferenceRequest(_Strict):
    id: str | None = Field(None, description="echoed in the response")
    parameters: ProtocolParameters | None = Field(
        None, description="binary_data_output: true (every output as raw bytes, unless it says otherwise)"
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="none: every output (probabilities)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: ProtocolParameters | None = None
    data: list[float] | list[str] | None = Field(None, description="absent when sent as binary data")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: ProtocolParameters | None = None
    outputs: list[ResponseOutput]
