"""Devices: artifacts validated on emulated ARM64 cores and on an SSH board, and what fails.

The emulated device is set up here from the package registries (as ``odconv-deploy device
setup arm64-emu`` does; reused from the cache once made). The SSH device is a real OpenSSH
server this module starts on 127.0.0.1 with keys it generates, running the x86-64 runners.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export.result import ExportFormat
from export.run import export_formats
from export.validation import INT8_REFERENCE, PT2E_REFERENCE, validate_artifacts
from odconv_deploy.calibration import resolve_calibration
from odconv_deploy.cli import main
from odconv_deploy.conversions import Conversions
from odconv_deploy.devices import (
    ARM64_CPUS,
    DeviceError,
    DeviceRunner,
    EmulatedArm64Device,
    HostDevice,
    RunnerSession,
    SshDevice,
    parse_device,
)
from odconv_deploy.devices.cpu import describe_cpu
from odconv_deploy.devices.protocol import signal_name
from odconv_deploy.devices.provision import arm64_layout, setup_arm64
from odconv_deploy.model_source import load_model
from runtime_bench.bench import BenchConfig, BenchSubject, device_rows, prepare_subjects
from runtime_bench.measure import MeasureSettings
from tests.detector_net import INPUT_SHAPE as DETECTOR_SHAPE

SHIPPED = [ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT,
           ExportFormat.EXECUTORCH]
CPUS = ("cortex-a55", "cortex-a76")
A55_CPUINFO = {"processor": "0", "Features": "fp asimd aes pmull sha1 sha2 crc32 atomics fphp "
               "asimdhp cpuid asimdrdm lrcpc dcpop asimddp", "CPU implementer": "0x41",
               "CPU architecture": "8", "CPU variant": "0x2", "CPU part": "0xd05",
               "CPU revision": "0"}


# -- parsing and pure parts ------------------------------------------------------------------
def test_device_names_parse_and_bad_ones_say_what_is_accepted():
    assert isinstance(parse_device("host"), HostDevice)
    assert parse_device("arm64-emu").name == "arm64-emu:cortex-a55"  # one phone-class core
    assert parse_device("arm64-emu:cortex-a76").cpu_model == "cortex-a76"
    ssh = parse_device("ssh://pi@board.local:2200?python=/opt/venv/bin/python")
    assert isinstance(ssh, SshDevice) and ssh.name == "ssh://pi@board.local:2200"
    assert ssh.python == "/opt/venv/bin/python"
    with pytest.raises(DeviceError, match="cortex-a55, cortex-a72|cortex-a53, cortex-a55"):
        parse_device("arm64-emu:cortex-z9")
    with pytest.raises(DeviceError, match="unknown option"):
        parse_device("ssh://pi@board?colour=blue")
    with pytest.raises(DeviceError, match="Android over adb.*not built"):
        parse_device("adb:emulator-5554")
    with pytest.raises(DeviceError, match="expected host, arm64-emu"):
        parse_device("phone")


def test_the_cpu_is_named_with_the_features_that_choose_kernels():
    a55 = describe_cpu(A55_CPUINFO)
    assert a55["model"] == "Cortex-A55 (r2p0)" and a55["arch"] == "aarch64"
    assert "asimddp" in a55["features"] and "i8mm" in a55["missing"]
    x86 = describe_cpu({"model name": "Some Xeon", "flags": "fpu sse4_1 avx avx2 fma"})
    assert x86["features"] == ["sse4_1", "avx", "avx2", "fma"] and "avx512f" in x86["missing"]
    assert describe_cpu({})["model"].startswith("unknown")


def test_signals_are_named_from_either_convention():
    assert signal_name(-signal.SIGILL).startswith("SIGILL")
    assert signal_name(128 + signal.SIGSEGV).startswith("SIGSEGV")  # from a shell or ssh
    assert signal_name(0) is None and signal_name(3) is None


def test_a_runner_killed_by_a_signal_is_reported_with_the_signal_and_the_cpu(tmp_path):
    runner = tmp_path / "runner.sh"
    runner.write_text('#!/bin/sh\necho \'ready {"runtime": "fake"}\'\nread line\n'
                      'echo "about to die" >&2\nkill -SEGV $$\n')
    runner.chmod(0o755)
    session = RunnerSession([str(runner)], where="board", cpu="Cortex-A55 (r2p0)")
    with pytest.raises(DeviceError, match=r"died by SIGSEGV .* on Cortex-A55 \(r2p0\) during "
                                          r"inference; it said: about to die"):
        session.infer([np.zeros((1, 3), np.float32)])


# -- the emulated ARM64 device ---------------------------------------------------------------
@pytest.fixture(scope="module")
def arm64():
    """The emulated device's parts, fetched from Debian and PyPI once (then cached)."""
    report = setup_arm64()
    assert not report.failures, report.failures
    assert not arm64_layout().missing()
    return arm64_layout()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """od_mobilenetv2_050 k=4 (synthetic weights) as ONNX, simplified ONNX, .ort and .pte."""
    loaded = load_model("od_mobilenetv2_050")
    results = export_formats(loaded.model, tmp_path_factory.mktemp("mnv2"), SHIPPED,
                             io_spec=loaded.io_spec, stem="mnv2", measure_sizes=False)
    assert all(r.ok for r in results), [r.error for r in results]
    return loaded, {r.format: r for r in results}


def _on_device_passes(report, devices, formats=("ort", "pte"), batches=(1, 3)):
    device_rows_ = [c for c in report.comparisons if "@" in c.runner]
    assert {c.runner for c in device_rows_} == {f"{f} @ {d}" for f in formats for d in devices}
    assert all(device_rows_), report.to_markdown()
    assert {c.batch for c in device_rows_} == set(batches)
    return report.on_device


def test_mobilenet_ort_and_pte_match_pytorch_on_emulated_a55_and_a76(arm64, mobilenet):
    loaded, results = mobilenet
    devices = [EmulatedArm64Device(cpu) for cpu in CPUS]
    report = validate_artifacts(loaded.model, list(results.values()), io_spec=loaded.io_spec,
                                devices=devices)
    assert report.passed, report.to_markdown()
    section = _on_device_passes(report, [d.name for d in devices])
    assert [(r.device, r.artifact) for r in section.rows] == [
        (d.name, f"mnv2{suffix}") for d in devices for suffix in (".ort", ".pte")]
    for row in section.rows:
        # the runtime's own process saw the emulated core, not this host's CPU
        assert row.cpu.startswith({"arm64-emu:cortex-a55": "Cortex-A55",
                                   "arm64-emu:cortex-a76": "Cortex-A76"}[row.device])
        assert "asimd" in row.features and row.batches == [1, 3]
        assert row.max_abs_vs_host <= 1e-5 * row.host_peak, row
    text = report.to_markdown()
    assert "On device:" in text and "emulated: numerics only, no latency" in text


def test_the_detector_network_matches_pytorch_on_emulated_a55_and_a76(arm64, tmp_path):
    loaded = load_model("tests.detector_net:build_detector", input_shape=DETECTOR_SHAPE)
    results = export_formats(loaded.model, tmp_path, [ExportFormat.ONNX, ExportFormat.ORT,
                                                      ExportFormat.EXECUTORCH],
                             io_spec=loaded.io_spec, measure_sizes=False)
    assert all(r.ok for r in results), [r.error for r in results]
    devices = [EmulatedArm64Device(cpu) for cpu in CPUS]
    # batch 1 only: the batch axis is covered by the MobileNet test; this one is the heads
    report = validate_artifacts(loaded.model, results, io_spec=loaded.io_spec, batches=(1,),
                                devices=devices)
    assert report.passed, report.to_markdown()
    _on_device_passes(report, [d.name for d in devices], batches=(1,))
    outputs = {o.name for c in report.comparisons if "@" in c.runner for o in c.outputs}
    assert outputs == {"output0", "output1", "output2"}  # every head, on every device


def test_int8_artifacts_match_their_references_on_arm_kernels(arm64, tmp_path):
    loaded = load_model("od_tinynet_digits")
    cal = resolve_calibration("int8", None, loaded.io_spec, zoo_name=loaded.zoo_name)
    conversions = Conversions(loaded.model, "im2col", precision="int8")
    results = export_formats(loaded.model, tmp_path, [ExportFormat.ONNX, ExportFormat.ORT,
                                                      ExportFormat.EXECUTORCH],
                             conversions=conversions, io_spec=loaded.io_spec, calibration=cal,
                             measure_sizes=False)
    devices = [EmulatedArm64Device(cpu) for cpu in CPUS]
    report = validate_artifacts(loaded.model, results, io_spec=loaded.io_spec, int8=True,
                                devices=devices)
    assert report.passed, report.to_markdown()
    assert INT8_REFERENCE in report.reference and PT2E_REFERENCE in report.reference
    on_device = [c for c in report.comparisons if "@" in c.runner]
    assert len(on_device) == 2 * 2 * 2  # (ort, pte) x 2 CPUs x batches (1, 3)
    assert all(c.tolerance.rtol == 2e-2 for c in on_device)  # the int8 rule, as on the host


def test_an_artifact_the_device_refuses_fails_that_artifact_only(arm64, mobilenet, tmp_path):
    loaded, results = mobilenet
    broken = tmp_path / "broken.pte"
    broken.write_bytes(results[ExportFormat.EXECUTORCH].path.read_bytes()[:4096])
    device = EmulatedArm64Device("cortex-a55")
    good = DeviceRunner.from_export(device, results[ExportFormat.ORT])
    bad = DeviceRunner.from_export(device, results[ExportFormat.EXECUTORCH])
    bad.path = broken
    with pytest.raises(DeviceError, match="ExecuTorch cannot load .*broken.pte"):
        bad.activate()
    feed = {"image": np.zeros((1, 3, 224, 224), np.float32)}
    with good:
        assert good.infer(feed)["logits"].shape == (1, 1000)


def test_an_illegal_instruction_on_the_emulated_cpu_is_reported_as_sigill(arm64, tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    assert compiler, "CI installs g++-aarch64-linux-gnu (it builds the ExecuTorch runner)"
    source = tmp_path / "sve.c"
    # announce ready, then run an SVE instruction: the Cortex-A55 has no SVE
    source.write_text('#include <stdio.h>\nint main(void) { puts("ready {}"); fflush(stdout); '
                      'getchar(); __asm__ volatile("ptrue p0.b"); return 0; }\n')
    binary = tmp_path / "sve"
    subprocess.run([compiler, "-march=armv8.2-a+sve", "-O1", str(source), "-o", str(binary)],
                   check=True)
    device = EmulatedArm64Device("cortex-a55")
    session = RunnerSession([*device._qemu(), str(binary)], where=device.name,
                            cpu=device.check().details["cpu"]["model"])
    with pytest.raises(DeviceError, match=r"died by SIGILL .* on Cortex-A55"):
        session.infer([np.zeros(2, np.float32)])


def test_an_emulated_device_reports_no_latency(arm64, mobilenet):
    loaded, results = mobilenet
    config = BenchConfig(formats="ort,pte")
    subjects = [BenchSubject(name, role, loaded.model, results)
                for name, role in (("mnv2", "odconv"), ("twin", "static"))]
    rows = device_rows(subjects, loaded.io_spec, config, EmulatedArm64Device("cortex-a76"))
    assert len(rows) == 4 and all(r.status == "skipped" and not r.latency for r in rows)
    assert all("no latency" in r.reason for r in rows)


def test_device_setup_list_and_check_on_the_command_line(arm64, capsys):
    assert main(["device", "setup", "arm64-emu"]) == 0
    out = capsys.readouterr().out
    assert "already set up" in out and " MB in " in out and "Cortex-A55" in out
    assert main(["device", "list"]) == 0
    out = capsys.readouterr().out
    assert all(cpu in out for cpu in ARM64_CPUS) and "set up in" in out
    assert main(["device", "check", "arm64-emu:cortex-a710"]) == 0
    assert "Cortex-A710" in capsys.readouterr().out
    assert main(["device", "check", "ssh://nobody@127.0.0.1:1"]) == 1
    assert "unreachable" in capsys.readouterr().out


def test_a_malformed_device_is_refused_before_any_work(capsys):
    assert main(["validate", "--model", "od_tinynet_digits", "--device", "arm64-emu:z80",
                 "--formats", "onnx"]) == 3
    assert "unknown emulated CPU 'z80'" in capsys.readouterr().err


# -- the SSH device, against a real sshd on 127.0.0.1 ----------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 that takes one generated key; yields its URL maker."""
    server = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(server).exists():
        pytest.skip("needs OpenSSH's server (Debian: openssh-server; .ci/run installs it)")
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)],
                       check=True)
    shutil.copy(home / "user_key.pub", home / "authorized_keys")
    port = _free_port()
    config = home / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\n"
                      f"AuthorizedKeysFile {home}/authorized_keys\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                      f"PidFile {home}/sshd.pid\nPermitRootLogin prohibit-password\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation folder
    process = subprocess.Popen([server, "-D", "-e", "-f", str(config)],
                               stderr=subprocess.PIPE)
    deadline = time.time() + 10
    user = os.environ.get("USER") or __import__("getpass").getuser()

    def url(python=sys.executable, workdir=home / "device", port=port):
        return (f"ssh://{user}@127.0.0.1:{port}?key={home}/user_key&known_hosts={home}/known"
                f"&python={python}&workdir={workdir}")

    while SshDevice(url()).check(refresh=True).problems and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()
    yield url
    process.terminate()
    process.wait()


def test_ssh_device_end_to_end_push_validate_benchmark_pull(sshd, mobilenet, tmp_path):
    loaded, results = mobilenet
    device = SshDevice(sshd(workdir=tmp_path / "board"))
    check = device.check()
    assert check.ok and check.arch == "x86_64", check.to_dict()
    assert set(check.runtimes) == {"onnxruntime", "executorch"}
    report = validate_artifacts(loaded.model, list(results.values()), io_spec=loaded.io_spec,
                                devices=[device])
    assert report.passed, report.to_markdown()
    section = _on_device_passes(report, [device.name])
    assert all(r.max_abs_vs_host == 0.0 for r in section.rows)  # same build, same CPU
    staged = sorted(p.name for p in (tmp_path / "board" / "files").iterdir())
    assert any(n.endswith("-mnv2.ort") for n in staged) and any(n.endswith("-mnv2.pte")
                                                                for n in staged)
    assert any(n.endswith("-pte-runner") for n in staged)  # the runner bundle was pushed
    assert not any(n.endswith(".partial") for n in staged)
    # benchmarked on the device: latency from the runner there, with the ratio to the twin
    # (the small digits model, so that exporting its twin is quick)
    digits = load_model("od_tinynet_digits")
    config = BenchConfig(formats="ort,pte", out=str(tmp_path / "bench"),
                         settings=MeasureSettings(warmup=1, iterations=4))
    subjects = prepare_subjects(digits, config)
    rows = device_rows(subjects, digits.io_spec, config, device)
    assert [r.status for r in rows] == ["ok"] * 4, [r.reason for r in rows]
    odconv = [r for r in rows if r.role == "odconv"]
    assert all(r.latency["n"] == 4 and r.latency["median_ms"] > 0 for r in rows)
    assert all(r.ratio_to_static["rounds"] == 4 for r in odconv)
    assert {r.format for r in rows} == {f"ort@{device.name}", f"pte@{device.name}"}


def test_ssh_faults_fail_that_device_and_the_rest_goes_on(sshd, mobilenet, tmp_path):
    loaded, results = mobilenet
    closed = SshDevice(sshd(port=_free_port()))
    no_python_packages = tmp_path / "python-without-packages"
    no_python_packages.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    no_python_packages.chmod(0o755)
    bare = SshDevice(sshd(python=no_python_packages, workdir=tmp_path / "bare"))
    report = validate_artifacts(loaded.model, [results[ExportFormat.ORT]],
                                io_spec=loaded.io_spec, devices=[closed, bare, HostDevice()])
    by_runner = {c.runner: c for c in report.comparisons if c.batch in (0, 1)}
    assert "unreachable" in by_runner[f"ort @ {closed.name}"].error
    assert "Connection refused" in by_runner[f"ort @ {closed.name}"].error
    assert "missing runtime onnxruntime" in by_runner[f"ort @ {bare.name}"].error
    assert "No module named 'numpy'" in by_runner[f"ort @ {bare.name}"].error
    assert by_runner["ort @ host"] and by_runner["onnxruntime (.ort format)"]  # went on
    assert not report.passed
    checks = {d["device"]: d for d in report.on_device.devices}
    assert not checks[closed.name]["reachable"] and checks[bare.name]["reachable"]


def test_a_full_device_disk_is_refused_with_the_sizes(sshd, mobilenet, tmp_path):
    loaded, results = mobilenet
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a 4 MB tmpfs for the device's disk (mount: "
                    f"{mounted.stderr.decode().strip()})")
    try:
        device = SshDevice(sshd(workdir=disk))
        runner = DeviceRunner.from_export(device, results[ExportFormat.ORT])
        with pytest.raises(DeviceError, match=r"its disk is full for mnv2.ort: it needs "
                                              r"\d+\.\d MB and \d\.\d MB are free"):
            runner.activate()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- the main job -----------------------------------------------------------------------------
def test_the_main_job_validates_and_benchmarks_on_devices(arm64, tmp_path):
    import json

    from odconv_deploy.pipeline import PipelineOptions, run_pipeline

    report = run_pipeline(PipelineOptions(
        model="od_tinynet_digits", formats=("onnx", "onnx-sim", "ort", "pte"),
        bench_formats=("ort",), quick=True, out=str(tmp_path),
        devices=("arm64-emu:cortex-a55", "host")))
    assert report.ok, report.summary()
    text = (tmp_path / "report.md").read_text()
    assert "On device:" in text and "| arm64-emu:cortex-a55 | od_tinynet_digits.pte |" in text
    steps = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    on_device = steps["validate"]["data"]["validation"]["on_device"]
    assert {(r["device"], r["artifact"].rsplit(".", 1)[1]) for r in on_device["rows"]} == {
        (d, s) for d in ("arm64-emu:cortex-a55", "host") for s in ("ort", "pte")}
    rows = {(r["format"], r["role"]): r for r in steps["benchmark"]["data"]["rows"]}
    assert rows[("ort@host", "odconv")]["ratio_to_static"]["rounds"] == 5  # --quick
    assert rows[("ort@arm64-emu:cortex-a55", "odconv")]["status"] == "skipped"
