"""A third-party client that knows nothing of kvpool calls Generate through server reflection.

The client runs in its own interpreter and imports only grpcio, grpcio-reflection and protobuf:
the request and response types come from the server's reflection service, as they would for
grpcurl or Postman.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(sys.argv[1])
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName("kvpool.v1.Inference").methods_by_name["Generate"]
    Request = message_factory.GetMessageClass(method.input_type)
    Response = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict(
        {"prompt": "Hello from reflection", "sampling": {"maxNewTokens": 5}}, Request()
    )
    call = channel.unary_stream(
        "/kvpool.v1.Inference/Generate",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    chunks = [json_format.MessageToDict(c) for c in call(request, timeout=60)]
    assert not any(name.startswith("kvpool") for name in sys.modules), "imported kvpool"
    print(json.dumps({"services": services, "chunks": chunks}))
    """
)


def test_reflection_client_generates(stack):
    out = subprocess.run(
        [sys.executable, "-I", "-c", CLIENT, stack.target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "kvpool.v1.Inference" in result["services"]
    chunks = result["chunks"]
    tokens = [t for c in chunks for t in c.get("tokenIds", [])]
    assert len(tokens) == 5
    final = chunks[-1]
    assert final["finishReason"] == "FINISH_REASON_LENGTH"
    assert final["usage"]["completionTokens"] == 5 and final["usage"]["worker"]
