"""A KEDA-like client for Reveille's external scaler, written with grpcio.

Compiles proto/externalscaler.proto with grpcio-tools, calls the four RPCs, holds a
StreamIsActive stream, sends one HTTP request to the proxy (held while the backend starts), and
times the pushed `true` from the moment the request was sent. Prints one JSON object.

usage: keda_client.py PROTO_DIR OUT_DIR GRPC_ADDR PROXY_ADDR HOST SERVICE
"""

import importlib
import json
import socket
import sys
import time

import grpc
from grpc_tools import protoc


def main():
    proto_dir, out_dir, grpc_addr, proxy_addr, host, service = sys.argv[1:7]
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"{proto_dir}/externalscaler.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("externalscaler_pb2")
    pb_grpc = importlib.import_module("externalscaler_pb2_grpc")

    out = {}
    with grpc.insecure_channel(grpc_addr) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        ref = pb.ScaledObjectRef(name="so", namespace="default",
                                 scalerMetadata={"service": service, "targetValue": "5"})
        out["is_active_before"] = stub.IsActive(ref, timeout=10).result
        spec = stub.GetMetricSpec(ref, timeout=10).metricSpecs[0]
        out["spec_name"] = spec.metricName
        out["spec_target"] = spec.targetSizeFloat
        req = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
        out["value_before"] = stub.GetMetrics(req, timeout=10).metricValues[0].metricValueFloat
        try:
            stub.IsActive(pb.ScaledObjectRef(name="no-such-service"), timeout=10)
            out["unknown_code"] = "OK"
        except grpc.RpcError as e:
            out["unknown_code"] = e.code().name
            out["unknown_message"] = e.details()

        stream = stub.StreamIsActive(ref, timeout=60)
        out["stream_first"] = next(stream).result
        h, p = proxy_addr.rsplit(":", 1)
        conn = socket.create_connection((h, int(p)), timeout=30)
        sent = time.monotonic()
        conn.sendall(f"GET /python HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        msg = next(stream)
        out["push_ms"] = (time.monotonic() - sent) * 1000.0
        out["stream_pushed"] = msg.result
        out["is_active_held"] = stub.IsActive(ref, timeout=10).result
        out["value_held"] = stub.GetMetrics(req, timeout=10).metricValues[0].metricValueFloat
        stream.cancel()
        # The held request is answered once the backend is up.
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        out["answer_status"] = answer.split(b" ", 2)[1].decode() if answer else ""
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
