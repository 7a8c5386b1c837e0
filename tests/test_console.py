"""Console.capture: third-party chatter goes to the log, the tool's own lines to the terminal."""

import ctypes
import io
import logging
import os
import sys
import warnings

import pytest

from odconv_deploy.console import Console

CHATTER = [
    "py stdout chatter",
    "py stderr chatter",
    "py warning chatter",
    "logging chatter",
    "native stdout chatter",
    "native stderr chatter",
]


def _chatter():
    """Everything a third-party library might print, at Python and at fd level."""
    print("py stdout chatter")
    sys.stderr.write("py stderr chatter\n")
    warnings.warn("py warning chatter", UserWarning, stacklevel=1)
    logging.getLogger("thirdparty").warning("logging chatter")
    os.write(1, b"native stdout chatter\n")
    os.write(2, b"native stderr chatter\n")


def _own_lines(console):
    console.info("summary line")
    console.progress("-> export onnx ...")
    console.detail("detail line")


def _state():
    """What capture changes and must put back."""
    return (
        sys.stdout,
        sys.stderr,
        warnings.showwarning,
        list(logging.getLogger().handlers),
        os.fstat(1).st_ino,
        os.fstat(2).st_ino,
    )


@pytest.fixture
def always_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield


def _assert_logged(log, *, own=True):
    text = log.read_text(encoding="utf-8")
    for line in CHATTER:
        assert line in text, (line, text)
    if own:
        for line in ("summary line", "-> export onnx ...", "detail line"):
            assert line in text, (line, text)
    return text


def test_capture_with_capsys(tmp_path, capsys, always_warn):
    console = Console()
    log = tmp_path / "new_folder" / "run.log"
    before = _state()
    with console.capture(log) as got:
        assert got == log and console.log_path == log and console.capturing
        _chatter()
        _own_lines(console)
    assert console.log_path is None and not console.capturing
    assert _state() == before
    out, err = capsys.readouterr()
    assert out == "summary line\n"
    assert err == "-> export onnx ...\n"
    _assert_logged(log)


@pytest.mark.parametrize("fd_backed", [False, True], ids=["sys_streams", "fd_streams"])
def test_capture_with_capfd(tmp_path, capfd, always_warn, fd_backed):
    # fd_backed: streams writing to fds 1/2 themselves, like a real terminal. Without the dup
    # taken before dup2, the Console's lines would land in the log instead of the terminal.
    streams = [open(fd, "w", closefd=False) for fd in (1, 2)] if fd_backed else [None, None]
    try:
        console = Console(stream_out=streams[0], stream_err=streams[1])
        log = tmp_path / "run.log"
        before = _state()
        with console.capture(log):
            _chatter()
            _own_lines(console)
        assert _state() == before
    finally:
        for s in streams:
            if s is not None:
                s.close()
    out, err = capfd.readouterr()
    assert out == "summary line\n"
    assert err == "-> export onnx ...\n"
    _assert_logged(log)


def test_restored_after_exit(tmp_path, capfd, always_warn):
    console = Console()
    log = tmp_path / "run.log"
    showwarning = warnings.showwarning
    handlers = list(logging.getLogger().handlers)
    with console.capture(log):
        print("inside")
    assert warnings.showwarning is showwarning
    assert logging.getLogger().handlers == handlers
    print("after print")
    os.write(1, b"after native\n")
    os.write(2, b"after native err\n")
    with pytest.warns(UserWarning, match="after warning"):  # pytest sees it again
        warnings.warn("after warning", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert out == "after print\nafter native\n"
    assert "after native err" in err
    text = log.read_text(encoding="utf-8")
    assert "inside" in text and "after" not in text


def test_body_raising_restores_and_propagates(tmp_path, capfd):
    console = Console()
    log = tmp_path / "run.log"
    before = _state()
    with pytest.raises(RuntimeError, match="boom"), console.capture(log):
        print("before boom")
        os.write(2, b"native before boom\n")
        raise RuntimeError("boom")
    assert _state() == before
    assert console.log_path is None
    console.error("error: boom")
    out, err = capfd.readouterr()
    assert out == "" and err == "error: boom\n"
    text = log.read_text(encoding="utf-8")
    assert "before boom" in text and "native before boom" in text
    assert "error: boom" not in text


def test_verbose_redirects_nothing(tmp_path, capfd, always_warn):
    console = Console(verbose=True)
    log = tmp_path / "run.log"
    before = _state()
    with console.capture(log) as got:
        assert got is None and console.log_path is None
        assert _state() == before
        print("py stdout chatter")
        os.write(1, b"native stdout chatter\n")
        _own_lines(console)
    out, err = capfd.readouterr()
    assert out == "py stdout chatter\nnative stdout chatter\nsummary line\n"
    assert err == "-> export onnx ...\ndetail line\n"
    assert not log.exists()


def test_no_log_path_is_noop(capsys):
    console = Console()
    with console.capture(None) as got:
        assert got is None
        print("visible")
        console.detail("hidden detail")
    assert capsys.readouterr().out == "visible\n"


def test_nested_capture_reuses_log(tmp_path, capsys):
    console = Console()
    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    before = _state()
    with console.capture(outer):
        with console.capture(inner) as got:
            assert got == outer
            print("in inner")
        print("in outer after inner")
        console.info("own line")
    assert _state() == before
    assert not inner.exists()
    text = outer.read_text(encoding="utf-8")
    assert "in inner" in text and "in outer after inner" in text and "own line" in text
    assert capsys.readouterr().out == "own line\n"


def test_string_streams_and_append(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    console = Console(stream_out=out, stream_err=err)
    log = tmp_path / "run.log"
    log.write_text("earlier run\n", encoding="utf-8")
    with console.capture(log):
        console.info("done")
        console.progress("-> step")
    assert out.getvalue() == "done\n" and err.getvalue() == "-> step\n"
    assert log.read_text(encoding="utf-8") == "earlier run\ndone\n-> step\n"


@pytest.mark.skipif(os.name != "posix", reason="needs the C library's stdio via ctypes")
def test_c_stdio_output_is_captured(tmp_path, capfd):
    libc = ctypes.CDLL(None)
    console = Console()
    log = tmp_path / "run.log"
    with console.capture(log):
        libc.puts(b"c stdio chatter")  # buffered in C: capture's exit must fflush it here
    libc.fflush(None)
    out, err = capfd.readouterr()
    assert "c stdio chatter" not in out + err
    assert "c stdio chatter" in log.read_text(encoding="utf-8")
