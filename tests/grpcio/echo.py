"""gRPC on the C core (grpcio), both ends, for tests/grpcio.rs.

    echo.py serve          serves test.Echo on 127.0.0.1 (port printed on the first line)
    echo.py call PORT      calls it through 127.0.0.1:PORT, prints the results as JSON

Messages are raw bytes (identity serializers), so no generated code is needed.
"""
import hashlib
import json
import sys
from concurrent import futures

import grpc

MIB = 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", 4 * MIB), ("grpc.max_receive_message_length", 4 * MIB)]


def unary(request, context):
    context.set_trailing_metadata((("x-served", "unary"),))
    return request


def stream(request, context):
    for i in range(int(request)):
        yield b"item %d" % i


def fail(request, context):
    context.set_trailing_metadata((("x-detail", "why-not"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def serve():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # Ends when the test closes standard input (or dies).
    sys.stdin.read()
    server.stop(0)


def call(port):
    out = {}
    with grpc.insecure_channel("127.0.0.1:%s" % port, options=OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        unary_call = channel.unary_unary("/test.Echo/Unary")
        reply, c = unary_call.with_call(b"hello", timeout=20)
        out["unary"] = [reply.decode(), dict(c.trailing_metadata()).get("x-served")]
        big = bytes(range(256)) * (4 * 1024)
        reply = unary_call(big, timeout=20)
        out["mib"] = [len(reply), hashlib.sha256(reply).hexdigest() == hashlib.sha256(big).hexdigest()]
        items = channel.unary_stream("/test.Echo/Stream")(b"5", timeout=20)
        out["stream"] = [m.decode() for m in items]
        try:
            channel.unary_unary("/test.Echo/Fail")(b"x", timeout=20)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = [e.code().name, e.details(), dict(e.trailing_metadata()).get("x-detail")]
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        call(sys.argv[2])
