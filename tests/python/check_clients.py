"""Checks Berth's API from Python, as a client in another language would use it.

1. Generates a client from proto/ with grpcio-tools and uses it against a live control plane
   to create, get and list an agent, and (with --queue-agent) to page through a replay queue
   and read a request whose body is larger than a gRPC message.
2. With a reflection client (grpcio-reflection), checks that every berth.v1 service and
   grpc.health.v1.Health is listed and described, as `grpcurl list` / `describe` would.

Usage: check_clients.py --addr 127.0.0.1:7070 --token TOKEN --proto-dir proto
"""

import argparse
import importlib
import pathlib
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    from google.protobuf.descriptor_pool import DescriptorPool
except ImportError as e:  # pragma: no cover - a set-up problem, said plainly
    sys.exit(f"missing Python package ({e}): pip install -r tests/python/requirements.txt")

EXPECTED_SERVICES = {
    "berth.v1.AgentService",
    "berth.v1.NodeService",
    "berth.v1.RequestService",
    "berth.v1.NodeAgentService",
    "grpc.health.v1.Health",
}


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
                  grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self.metadata
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def generate(proto_dir: pathlib.Path, out: pathlib.Path):
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.glob("berth/v1/*.proto"))
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}", *protos,
    ])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, str(out))


def check_generated_client(channel, name):
    agent_pb2 = importlib.import_module("berth.v1.agent_pb2")
    agent_grpc = importlib.import_module("berth.v1.agent_pb2_grpc")
    stub = agent_grpc.AgentServiceStub(channel)
    spec = agent_pb2.AgentSpec(name=name, image="example/echo:1", replicas=2, env={"FROM": "python"})
    created = stub.CreateAgent(agent_pb2.CreateAgentRequest(spec=spec))
    assert created.meta.generation == 1, created
    got = stub.GetAgent(agent_pb2.GetAgentRequest(name=name))
    assert got.spec.env["FROM"] == "python", got
    assert got.spec.replicas == 2, got
    listed = stub.ListAgents(agent_pb2.ListAgentsRequest())
    assert name in [a.spec.name for a in listed.agents], listed
    try:
        stub.CreateAgent(agent_pb2.CreateAgentRequest(spec=agent_pb2.AgentSpec(name="Bad_Name", image="x")))
        raise AssertionError("a bad name was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "spec.name" in e.details(), e.details()
    print(f"generated client: created, got and listed agent {name}")


def check_requests(channel, agent, queued, large_id):
    """Pages through an agent's replay queue, and reads a request whose body is kept in pieces,
    with a channel's default limits (4 MiB a message)."""
    request_pb2 = importlib.import_module("berth.v1.request_pb2")
    request_grpc = importlib.import_module("berth.v1.request_pb2_grpc")
    stub = request_grpc.RequestServiceStub(channel)
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListRequests(request_pb2.ListRequestsRequest(agent=agent, limit=1000, page_token=token))
        seen += [r.id for r in page.requests]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == queued, f"{len(seen)} listed of {queued}"
    assert len(set(seen)) == queued, "a request listed twice"
    assert pages >= 2, pages
    try:
        stub.ListRequests(request_pb2.ListRequestsRequest(agent=agent, page_token="w:../../agents/x"))
        raise AssertionError("a page token of another listing was taken")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    large = stub.GetRequest(request_pb2.GetRequestRequest(id=large_id))
    assert large.body_bytes > len(large.body) > 0, (large.body_bytes, len(large.body))
    print(f"requests: {len(seen)} of {agent} in {pages} pages; {large_id}: "
          f"{large.body_bytes} bytes, the first {len(large.body)} shown")


def check_reflection(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    missing = EXPECTED_SERVICES - services
    assert not missing, f"reflection does not list {missing}; it lists {services}"
    pool = DescriptorPool(database)
    for service_name in sorted(EXPECTED_SERVICES):
        service = pool.FindServiceByName(service_name)
        methods = [m.name for m in service.methods]
        assert methods, f"{service_name} has no methods"
        for method in service.methods:
            # Describing a method means resolving its message types too.
            assert method.input_type.fields is not None and method.output_type.full_name
        print(f"reflection: {service_name}: {', '.join(methods)}")
    spec = pool.FindMessageTypeByName("berth.v1.AgentSpec")
    assert "gateway_token" in [f.name for f in spec.fields]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--proto-dir", required=True, type=pathlib.Path)
    parser.add_argument("--name", default="from-python")
    parser.add_argument("--queue-agent", help="an agent whose replay queue to page through")
    parser.add_argument("--queued", type=int, default=0, help="how many requests it holds")
    parser.add_argument("--large-id", help="one of them whose body is larger than a message")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="berth-py-") as out:
        generate(args.proto_dir.resolve(), pathlib.Path(out))
        channel = grpc.intercept_channel(grpc.insecure_channel(args.addr), BearerToken(args.token))
        check_generated_client(channel, args.name)
        if args.queue_agent:
            check_requests(channel, args.queue_agent, args.queued, args.large_id)
        check_reflection(channel)
        # Without a token, reflection is refused like every other call.
        bare = grpc.insecure_channel(args.addr)
        try:
            list(ProtoReflectionDescriptorDatabase(bare).get_services())
            raise AssertionError("reflection answered without a token")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    print("ok")


if __name__ == "__main__":
    main()
