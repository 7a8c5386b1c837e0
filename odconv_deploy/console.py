"""Keep the terminal readable: the tool's own lines on screen, third-party chatter in a log.

Converters and runtimes print a lot: coremltools warnings and tqdm bars, torchao notices,
onnxscript messages, Python ``warnings``, ``logging`` records of other libraries, and native
code (ExecuTorch's cpuinfo/threadpool lines, onnxruntime logging) that writes straight to file
descriptors 1 and 2. :class:`Console` prints the tool's progress and summary lines, and its
:meth:`Console.capture` context manager sends everything else into a log file::

    console = Console(verbose=args.verbose)
    with console.capture(out_dir / "odconv-deploy.log") as log:
        console.progress("-> export onnx ...")
        export_everything()                   # chatter lands in the log
        if log is not None:
            console.info(f"details in {log}")

With ``verbose=True`` (or no log path) nothing is redirected.

Only one capture is active per process at a time: a nested ``capture`` on the same Console
reuses the open log. The redirection is process-wide (``sys.stdout``/``sys.stderr``, fds 1 and 2,
``warnings.showwarning``, the root logger), so it is not meant for use from several threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["LOG_FORMAT", "Console"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Format of the ``logging`` records that :meth:`Console.capture` writes into the log."""

_STD_FDS = (1, 2)


def _std_fd(stream: TextIO) -> int | None:
    """Return 1 or 2 when ``stream`` writes to that file descriptor, else ``None``."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation, closed stream
        return None
    return fd if fd in _STD_FDS else None


def _flush(stream: TextIO | None) -> None:
    """Flush ``stream``, ignoring streams that are closed, broken or missing."""
    if stream is None:
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()


@functools.cache
def _c_fflush() -> Callable[[None], int] | None:
    """Return the C library's ``fflush`` (POSIX only), or ``None`` where it is not reachable."""
    if os.name != "posix":
        return None
    try:
        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None


def _flush_all() -> None:
    """Flush ``sys.stdout``, ``sys.stderr`` and, best effort, every C stdio output stream.

    Called before each ``dup2`` so that text buffered in Python or in C lands where it was
    written, not wherever fd 1/2 points later.
    """
    _flush(sys.stdout)
    _flush(sys.stderr)
    fflush = _c_fflush()
    if fflush is not None:
        with contextlib.suppress(Exception):
            fflush(None)


class Console:
    """The tool's terminal output, plus a capture of everything else into a log file.

    Args:
        verbose: Show :meth:`detail` lines and never redirect anything.
        stream_out: Where :meth:`info` writes; default: ``sys.stdout`` as of construction.
        stream_err: Where :meth:`progress`, :meth:`error` and :meth:`detail` write; default:
            ``sys.stderr`` as of construction.

    Every line is flushed at once. While :meth:`capture` is active, each line also goes into
    the log, so the log is a complete record of the run.
    """

    def __init__(
        self,
        verbose: bool = False,
        stream_out: TextIO | None = None,
        stream_err: TextIO | None = None,
    ) -> None:
        self.verbose = verbose
        self.stream_out: TextIO = stream_out if stream_out is not None else sys.stdout
        self.stream_err: TextIO = stream_err if stream_err is not None else sys.stderr
        # Where lines go right now: the streams above, or dups of their fds while capturing.
        self._active_out: TextIO = self.stream_out
        self._active_err: TextIO = self.stream_err
        self._log: TextIO | None = None
        self._log_path: Path | None = None
        self._depth = 0

    # -- messages -----------------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        """The log file being written by an active :meth:`capture`, else ``None``."""
        return self._log_path

    @property
    def capturing(self) -> bool:
        """Whether a :meth:`capture` with a log file is active."""
        return self._log is not None

    def info(self, msg: str) -> None:
        """Print a result or summary line to the out stream."""
        self._emit(self._active_out, msg)

    def progress(self, msg: str) -> None:
        """Print a progress line (e.g. ``"-> export onnx ..."``) to the err stream."""
        self._emit(self._active_err, msg)

    def error(self, msg: str) -> None:
        """Print an error line to the err stream."""
        self._emit(self._active_err, msg)

    def detail(self, msg: str) -> None:
        """Print a line to the err stream only when verbose; always write it to an open log."""
        self._emit(self._active_err if self.verbose else None, msg)

    def _emit(self, stream: TextIO | None, msg: str) -> None:
        """Write ``msg`` and a newline to ``stream`` (if any) and to the open log (if any)."""
        line = f"{msg}\n"
        if stream is not None:
            stream.write(line)
            stream.flush()
        if self._log is not None:
            with contextlib.suppress(OSError, ValueError):  # a library may close sys.stdout
                self._log.write(line)
                self._log.flush()

    # -- capture ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self, log_path: str | os.PathLike[str] | None) -> Iterator[Path | None]:
        """Send third-party output into ``log_path`` while the block runs; yield the log's path.

        Inside the block ``sys.stdout`` and ``sys.stderr`` are the log's text stream, file
        descriptors 1 and 2 point at the log file (so output of native code lands there too),
        ``warnings.showwarning`` writes into the log and the root logger has a handler writing
        into it. This Console's own lines still reach the original streams: through a dup of
        fd 1/2 taken before the redirection where the stream is backed by that fd, else by
        writing to the stream object itself (e.g. ``io.StringIO``, pytest's capture).

        The log is opened in append mode (UTF-8) and its folder created if needed. Everything is
        restored on exit, also when the block raises.

        With ``verbose=True`` or ``log_path=None`` nothing is redirected and ``None`` is
        yielded. A nested ``capture`` while this Console already captures redirects nothing
        more: it ignores its argument and yields the log already open.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self._log_path
            finally:
                self._depth -= 1
            return
        if self.verbose or log_path is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            path = self._open_log(stack, Path(log_path))
            self._route_own_lines(stack)
            self._redirect_fds(stack)
            self._redirect_python(stack)
            self._depth = 1
            try:
                yield path
            finally:
                self._depth = 0

    def _open_log(self, stack: contextlib.ExitStack, path: Path) -> Path:
        """Open the log (closed when ``stack`` unwinds) and make it this Console's log."""
        path.parent.mkdir(parents=True, exist_ok=True)
        log = stack.enter_context(
            open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        )

        def detach() -> None:
            self._log = None
            self._log_path = None

        stack.callback(detach)
        self._log, self._log_path = log, path
        return path

    def _route_own_lines(self, stack: contextlib.ExitStack) -> None:
        """Point this Console's lines at the original terminal before fds 1/2 move."""
        self._active_out = self._terminal(stack, self.stream_out)
        self._active_err = self._terminal(stack, self.stream_err)

        def restore() -> None:
            self._active_out = self.stream_out
            self._active_err = self.stream_err

        stack.callback(restore)

    @staticmethod
    def _terminal(stack: contextlib.ExitStack, stream: TextIO) -> TextIO:
        """Return a stream on a dup of ``stream``'s fd 1/2, or ``stream`` if not fd-backed."""
        fd = _std_fd(stream)
        if fd is None:
            return stream
        _flush(stream)
        try:
            dup = os.dup(fd)
        except OSError:
            return stream
        try:
            term = open(  # closed when the stack unwinds
                dup,
                "w",
                encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="backslashreplace",
                buffering=1,
            )
        except Exception:
            os.close(dup)
            raise
        stack.callback(term.close)
        return term

    def _redirect_fds(self, stack: contextlib.ExitStack) -> None:
        """``dup2`` the log onto fds 1 and 2; restore them when ``stack`` unwinds."""
        assert self._log is not None
        log = self._log
        for fd in _STD_FDS:
            try:
                saved = os.dup(fd)
            except OSError:  # fd not open (e.g. a daemon): nothing to redirect
                continue

            def restore(fd: int = fd, saved: int = saved) -> None:
                _flush(log)
                _flush_all()
                try:
                    os.dup2(saved, fd)
                finally:
                    os.close(saved)

            _flush_all()
            try:
                os.dup2(log.fileno(), fd)
            except OSError:
                os.close(saved)
                raise
            stack.callback(restore)

    def _redirect_python(self, stack: contextlib.ExitStack) -> None:
        """Point ``sys.stdout``/``sys.stderr``, ``warnings`` and the root logger at the log."""
        assert self._log is not None
        log = self._log

        saved_out, saved_err = sys.stdout, sys.stderr

        def restore_streams() -> None:
            _flush(log)
            sys.stdout, sys.stderr = saved_out, saved_err

        sys.stdout = sys.stderr = log
        stack.callback(restore_streams)

        saved_showwarning = warnings.showwarning

        def showwarning(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            text = warnings.formatwarning(message, category, filename, lineno, line)
            with contextlib.suppress(OSError, ValueError):
                log.write(text)
                log.flush()

        def restore_showwarning() -> None:
            warnings.showwarning = saved_showwarning

        warnings.showwarning = showwarning
        stack.callback(restore_showwarning)

        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()

        def remove_handler() -> None:
            root.removeHandler(handler)
            handler.close()

        root.addHandler(handler)
        stack.callback(remove_handler)
