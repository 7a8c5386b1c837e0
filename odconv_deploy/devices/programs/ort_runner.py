"""odconv-deploy's ONNX Runtime runner for a device (the device protocol on stdin/stdout).

It loads one .onnx/.ort model and serves odconv_deploy/devices/protocol.py's requests. It
runs on the device's own Python with only numpy and onnxruntime, so it imports nothing of
odconv-deploy. Latency is timed here, on the device.

    python3 ort_runner.py MODEL THREADS [SITE_DIR]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, BinaryIO


def cpuinfo() -> dict[str, str]:
    """The first processor's lines of /proc/cpuinfo as this process sees them."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def reply(stream: BinaryIO, line: str) -> None:
    """Send one protocol line."""
    stream.write(line.encode() + b"\n")
    stream.flush()


def read_tensors(np: Any, stream: BinaryIO, count: int) -> list[Any]:
    """Read ``count`` tensors (header line, then float32 bytes)."""
    tensors = []
    for _ in range(count):
        header = stream.readline().decode().split()
        if not header:
            raise EOFError("input ended in a tensor header")
        if header[0] != "f4":
            raise ValueError(f"only float32 (f4) inputs are supported, got {header[0]}")
        shape = tuple(int(d) for d in header[2:2 + int(header[1])])
        size = 4 * int(np.prod(shape, dtype=np.int64))
        data = stream.read(size)
        if len(data) != size:
            raise EOFError("input ended inside tensor data")
        tensors.append(np.frombuffer(data, dtype="<f4").reshape(shape))
    return tensors


def write_tensors(np: Any, stream: BinaryIO, arrays: list[Any]) -> None:
    """Send ``ok N`` and N tensors."""
    stream.write(f"ok {len(arrays)}\n".encode())
    for array in arrays:
        array = np.ascontiguousarray(array, dtype="<f4")
        stream.write(f"f4 {array.ndim} {' '.join(map(str, array.shape))}\n".encode())
        stream.write(array.tobytes())
    stream.flush()


def main() -> int:
    """Load the model, say ``ready``, answer requests until ``quit``."""
    model, threads = sys.argv[1], max(1, int(sys.argv[2]))
    if len(sys.argv) > 3:
        sys.path.insert(0, sys.argv[3])
    out = sys.stdout.buffer
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as exc:
        reply(out, f"error missing runtime: {exc} (python {sys.version.split()[0]} at "
                   f"{sys.executable})")
        return 3
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - reported to the host
        reply(out, f"error ONNX Runtime cannot load {model}: {type(exc).__name__}: "
                   f"{str(exc)[:300]}".replace("\n", " "))
        return 3
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    reply(out, "ready " + json.dumps({"runtime": "onnxruntime", "version": ort.__version__,
                                      "threads": threads, "cpuinfo": cpuinfo()}))
    stream = sys.stdin.buffer
    while True:
        request = stream.readline().decode().split()
        if not request or request[0] == "quit":
            return 0
        op, args = request[0], [int(a) for a in request[1:]]
        if op not in ("infer", "bench"):
            reply(out, f"error unknown request: {' '.join(request)}")
            continue
        warmup, runs, count = (0, 1, args[0]) if op == "infer" else args
        try:
            feed = dict(zip(inputs, read_tensors(np, stream, count)))  # noqa: B905 - Python < 3.10
        except (EOFError, ValueError) as exc:
            reply(out, f"error {exc}")
            return 4
        try:
            times = []
            for i in range(warmup + runs):
                start = time.perf_counter()
                result = session.run(outputs, feed)
                if i >= warmup:
                    times.append(1e3 * (time.perf_counter() - start))
        except Exception as exc:  # noqa: BLE001 - reported to the host
            reply(out, f"error {type(exc).__name__}: {str(exc)[:300]}".replace("\n", " "))
            continue
        if op == "infer":
            write_tensors(np, out, result)
        else:
            reply(out, "ok " + json.dumps({"times_ms": times}))


if __name__ == "__main__":
    sys.exit(main())
