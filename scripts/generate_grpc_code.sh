#!/bin/sh
# Regenerates service/grpc_generated/*_pb2*.py from the .proto files beside them: Triton's published
# grpc_service.proto and model_config.proto (github.com/triton-inference-server/common, protobuf/, commit
# 83adf7c), the KServe v2 gRPC protocol plus Triton's ModelConfig. Needs grpcio-tools (the dev extra has it
# through kserve); its protoc sets the oldest protobuf and grpcio the code runs with (pyproject.toml pins them).
#
#   .venv/bin/python -m pip install grpcio-tools && PYTHON=$PWD/.venv/bin/python sh scripts/generate_grpc_code.sh
set -eu
cd "$(dirname "$0")/../service/grpc_generated"
"${PYTHON:-python}" -m grpc_tools.protoc -I . --python_out=. model_config.proto
"${PYTHON:-python}" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. grpc_service.proto
# protoc writes imports as if this folder were on sys.path; here it is a package.
sed -i 's/^import model_config_pb2 as/from . import model_config_pb2 as/' grpc_service_pb2.py
sed -i 's/^import grpc_service_pb2 as/from . import grpc_service_pb2 as/' grpc_service_pb2_grpc.py
