"""``python tests/support/kserve_client.py URL PHOTO…``: what KServe's own REST client (kserve.InferenceRESTClient,
the v2 protocol) gets from a server, printed as one JSON object for tests/test_service_kserve.py. That client has
no metadata call: the metadata and readiness bodies are read with KServe's own models of them (v2_datamodels),
which refuse a body without the fields KServe's servers answer.

It runs in its own process because kserve and tritonclient.grpc each register protobuf messages named
``inference.*`` from different .proto files, and protobuf refuses the second in the same process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest import v2_datamodels as kserve_models


async def main(url: str, photos: list[Path]) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    try:
        images = InferInput("image", [len(photos)], "BYTES")
        images.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=np.object_), binary_data=True)
        top3 = RequestedOutput("probabilities", parameters={"classification": 3})
        response = await client.infer(
            url, InferRequest("alexnet", [images], request_id="kserve-1", request_outputs=[top3]), "alexnet"
        )
        (output,) = response.outputs
        try:
            await client.infer(url, InferRequest("resnet", [images]), "resnet")
            unknown_model = None
        except httpx.HTTPStatusError as e:
            unknown_model = {"status": e.response.status_code, "message": str(e)}
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            bodies = {
                "server_metadata": kserve_models.ServerMetadataResponse.model_validate_json(
                    (await http.get("/v2")).content
                ),
                "model_metadata": kserve_models.ModelMetadataResponse.model_validate_json(
                    (await http.get("/v2/models/alexnet")).content
                ),
                "server_live": kserve_models.ServerLiveResponse.model_validate_json(
                    (await http.get("/v2/health/live")).content
                ),
                "server_ready": kserve_models.ServerReadyResponse.model_validate_json(
                    (await http.get("/v2/health/ready")).content
                ),
                "model_ready": kserve_models.ModelReadyResponse.model_validate_json(
                    (await http.get("/v2/models/alexnet/ready")).content
                ),
            }
        return {
            "bodies": {name: body.model_dump() for name, body in bodies.items()},
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, "alexnet"),
            "other_model_ready": await client.is_model_ready(url, "resnet"),
            "infer": {
                "model_name": response.model_name,
                "id": response.id,
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(output.shape),
                "data": [
                    [s.decode() if isinstance(s, bytes) else s for s in row] for row in output.as_numpy().tolist()
                ],
            },
            "unknown_model": unknown_model,
        }
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], [Path(p) for p in sys.argv[2:]]))))
