"""POST /explain: one image in, Grad-CAM out — where in the centre crop the net found the evidence for a
class (the top class, or the one asked for by ``class_index`` or ``wnid``), as a PNG overlay or as JSON.

The same body limits and errors as /classify, but exactly one image. Grad-CAM needs autograd, so it runs
the two-tower ``AlexNet`` (built once per loaded model, on first use), in threads of its own — never on the
event loop or in the inference thread, so /classify and /embed go on being answered meanwhile. At most
``ALEXNET_EXPLAIN_CONCURRENCY`` explanations are under way at once (from reading the body to the answer);
the next one is refused with 503 and Retry-After rather than queued."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..engine import LoadedModel, WeightsUnavailable
from ..problems import ProblemError
from ..schemas import ExplainedClass, ExplainParams, ExplainResponse
from .dependencies import ReadyModel, State
from .images import Clock, error_responses, receive, request_body

router = APIRouter(tags=["explain"])

PNG = {"schema": {"type": "string", "format": "binary"}}


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Grad-CAM: where the net looks for a class in one image",
    openapi_extra={"requestBody": request_body(one=True)},
    responses={
        200: {
            "description": "format=png (the default): the heat map drawn over the centre crop (crop × crop "
            "pixels), with the class in the X-Class-Index, X-Class-Wnid (percent-encoded) and X-Class-Probability "
            "headers, and the map's largest value in X-Heatmap-Max (1 where the map has a peak; 0: no evidence for "
            "the class anywhere in the crop, the map is 0 everywhere); format=json: the map itself",
            "content": {"image/png": PNG},
        },
        **error_responses(
            e413="body too large, more than one file, or an image with too many pixels",
            e422="corrupt, truncated or empty image; no file part; unknown wnid, class_index out of range, both "
            "given, or another bad parameter",
            e503="ALEXNET_EXPLAIN_CONCURRENCY explanations already under way (see Retry-After), the model is not "
            "loaded, or its checkpoint file was rewritten in place and the new one is not serving yet",
        ),
    },
)
async def explain(
    request: Request, state: State, model: ReadyModel, params: Annotated[ExplainParams, Query()]
) -> Response:
    clock = Clock()
    class_index = _class_index(model, params)
    with state.explainers.admission():
        try:
            _, (image,) = await receive(request, state, model, clock, max_files=1)
        except ProblemError as e:
            if e.slug == "too-many-files":
                e.detail = "more than one file: /explain explains one image per request"
            raise
        clock.compute_started = time.perf_counter()
        try:
            explanation, png = await state.explainers.explain(model, image, class_index, as_png=params.format == "png")
        except WeightsUnavailable as e:
            retry = max(1, round(2 * state.settings.reload_interval_s))
            raise ProblemError(503, "model-changing", str(e), {"Retry-After": str(retry)}) from None
        clock.done = time.perf_counter()
    state.metrics.images_explained.inc(params.format)

    image_class = model.classes[explanation.class_index]
    if png is not None:
        headers = {
            "X-Class-Index": str(explanation.class_index),
            "X-Class-Wnid": _header_safe(image_class.wnid),
            "X-Class-Probability": repr(explanation.probability),
            "X-Heatmap-Max": repr(float(explanation.heat.max())),  # 0: no evidence anywhere (an even tint)
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",  # an image, never to be read as anything else
        }
        return Response(png, media_type="image/png", headers=headers)
    body = ExplainResponse.model_construct(
        model=model.identity,
        explained=ExplainedClass(
            index=explanation.class_index,
            wnid=image_class.wnid,
            label=image_class.label,
            probability=explanation.probability,
        ),
        size=explanation.heat.shape[0],
        heatmap=explanation.rounded(),
        timing=clock.timing(),
    )
    return Response(body.model_dump_json(), media_type="application/json")


def _class_index(model: LoadedModel, params: ExplainParams) -> int | None:
    classes = len(model.classes)
    if params.class_index is not None and params.class_index >= classes:
        raise ProblemError(
            422, "invalid-parameter", f"class_index: at most {classes - 1} (this model has {classes} classes)"
        )
    if params.wnid is not None:
        if params.wnid not in model.wnids:
            raise ProblemError(
                422, "invalid-parameter", f"wnid: {params.wnid[:100]!r} is not one of this model's classes"
            )
        return model.wnids[params.wnid]
    return params.class_index


def _header_safe(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
