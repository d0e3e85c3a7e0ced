"""The public gRPC API (proto/lorax/generate/v1/generate.proto) through Python grpcio, with stubs that
grpcio-tools generates from the proto at test time, against a running server (scripts/ci/with_server.sh
exports LORAX_GRPC_ADDR and LORAX_URL). The reference answers are the REST API's, which
tests/clients checks against the golden fixtures."""

import importlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "lorax" / "generate" / "v1"
URL = os.environ["LORAX_URL"]
ADDR = os.environ["LORAX_GRPC_ADDR"]
PROMPT = "The capital of France is"
N_NEW = 12


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """The generated message and stub modules, as (generate_pb2, generate_pb2_grpc)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    include = Path(protoc.__file__).parent / "_proto"
    # Compiled from its own directory, so the modules are top-level (`generate_pb2`): a `lorax`
    # package path would clash with the lorax-client package installed next to grpcio.
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "generate.proto",
        ]
    )
    assert status == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("generate_pb2"), importlib.import_module("generate_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def stub(pb):
    _, pb_grpc = pb
    with grpc.insecure_channel(ADDR) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.LoraxServiceStub(channel)


def rest(path, body):
    """POST `body` to the REST API: (status, JSON answer)."""
    request = urllib.request.Request(
        URL + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def request(pb, **parameters):
    pb2, _ = pb
    return pb2.GenerateRequest(inputs=PROMPT, parameters=pb2.GenerateParameters(**parameters))


def test_health(pb, stub):
    pb2, _ = pb
    assert stub.Health(pb2.HealthRequest(), timeout=30) is not None


def test_generate_equals_rest(pb, stub):
    pb2, _ = pb
    answer = stub.Generate(
        request(pb, max_new_tokens=N_NEW, details=True, ignore_eos_token=True, return_k_alternatives=2),
        timeout=120,
    )
    status, expected = rest(
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": N_NEW,
                "details": True,
                "ignore_eos_token": True,
                "return_k_alternatives": 2,
            },
        },
    )
    assert status == 200, expected
    assert answer.generated_text == expected["generated_text"]
    assert [t.id for t in answer.details.tokens] == [t["id"] for t in expected["details"]["tokens"]]
    assert [t.text for t in answer.details.tokens] == [t["text"] for t in expected["details"]["tokens"]]
    assert [[a.id for a in t.alternative_tokens] for t in answer.details.tokens] == [
        [a["id"] for a in t["alternative_tokens"]] for t in expected["details"]["tokens"]
    ]
    assert answer.details.finish_reason == pb2.FINISH_REASON_LENGTH
    assert answer.details.generated_tokens == N_NEW
    assert answer.details.prompt_tokens == expected["details"]["prompt_tokens"]
    assert not answer.details.HasField("adapter_id")


def test_generate_stream_equals_unary(pb, stub):
    pb2, _ = pb
    parameters = {"max_new_tokens": N_NEW, "ignore_eos_token": True}
    whole = stub.Generate(request(pb, details=True, **parameters), timeout=120)
    messages = list(stub.GenerateStream(request(pb, **parameters), timeout=120))
    assert len(messages) == N_NEW
    assert [m.token.id for m in messages] == [t.id for t in whole.details.tokens]
    assert all(not m.HasField("generated_text") and not m.HasField("details") for m in messages[:-1])
    last = messages[-1]
    assert last.generated_text == whole.generated_text == "".join(m.token.text for m in messages)
    assert last.details.finish_reason == pb2.FINISH_REASON_LENGTH
    assert last.details.generated_tokens == N_NEW


def test_adapter_through_grpc(pb, stub):
    pb2, _ = pb
    parameters = {
        "adapter_id": "lora-r8",
        "adapter_source": "local",
        "max_new_tokens": N_NEW,
        "details": True,
        "ignore_eos_token": True,
    }
    answer = stub.Generate(request(pb, **parameters), timeout=120)
    status, expected = rest("/generate", {"inputs": PROMPT, "parameters": parameters})
    assert status == 200, expected
    assert [t.id for t in answer.details.tokens] == [t["id"] for t in expected["details"]["tokens"]]
    assert answer.details.adapter_id == "lora-r8"
    base = stub.Generate(request(pb, max_new_tokens=N_NEW, details=True, ignore_eos_token=True), timeout=120)
    assert [t.id for t in answer.details.tokens] != [t.id for t in base.details.tokens]
    listed = stub.ListAdapters(pb2.ListAdaptersRequest(), timeout=30).adapters
    known = {(a.adapter_source, a.adapter_id): a for a in listed}
    assert ("local", "lora-r8") in known, listed
    assert known[("local", "lora-r8")].state == pb2.ADAPTER_STATE_ACTIVE


def error_of(call):
    """The code, `x-error-type` and details of the call that `call` makes and fails."""
    with pytest.raises(grpc.RpcError) as failure:
        call()
    error = failure.value
    metadata = dict(error.trailing_metadata() or ())
    return error.code(), metadata.get("x-error-type"), error.details()


def test_errors_have_codes_and_error_types(pb, stub):
    code, error_type, message = error_of(lambda: stub.Generate(request(pb, top_k=0), timeout=30))
    assert (code, error_type) == (grpc.StatusCode.INVALID_ARGUMENT, "validation")
    status, expected = rest("/generate", {"inputs": PROMPT, "parameters": {"top_k": 0}})
    assert (status, message) == (422, expected["error"])

    code, error_type, _ = error_of(
        lambda: list(stub.GenerateStream(request(pb, decoder_input_details=True), timeout=30))
    )
    assert (code, error_type) == (grpc.StatusCode.INVALID_ARGUMENT, "validation")

    code, error_type, message = error_of(
        lambda: stub.Generate(request(pb, adapter_id="no-such-adapter", adapter_source="local"), timeout=60)
    )
    assert (code, error_type) == (grpc.StatusCode.NOT_FOUND, "adapter_not_found"), message


def test_tokenize_equals_rest(pb, stub):
    pb2, _ = pb
    tokens = stub.Tokenize(pb2.TokenizeRequest(inputs=PROMPT), timeout=30).tokens
    status, expected = rest("/tokenize", {"inputs": PROMPT})
    assert status == 200
    assert [(t.id, t.text, t.start, t.stop) for t in tokens] == [
        (t["id"], t["text"], t["start"], t["stop"]) for t in expected
    ]
