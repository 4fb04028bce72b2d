"""A warm process for the stage commands. Every DVC stage is a process of its own
(`python -m stages.<name>`), and importing torch, diffusers and MLflow costs each of them seconds
(about 7 s on a 2-core CPU), which a run of 30 round stages pays 30 times. So the first stage
command starts, in the background, a process that imports those libraries once and then forks one
child per stage command, as a pre-loading application server does; each later stage command hands
it its command line, folder, environment and terminal, forwards Ctrl-C and SIGTERM to the child, and
exits with the child's status. The child dies with the command that handed it over (a killed
`dvc repro` leaves no stage running) and with the warm process.

Only third-party libraries are imported ahead: the project's code is imported by each child, from
the stage's folder, so an edit is never run stale (a module of the project that the warm process
did import is checked against its file before every fork). A warm process serves one Python, one
folder and one set of the environment variables libraries read when imported, and exits after
IDLE_SECONDS without a stage. It is not used, and the stage runs in its own process as before, off
Linux, under a distributed launcher (torchrun and accelerate set WORLD_SIZE), on a machine with an
NVIDIA device (CUDA's state does not survive a fork), with interpreter options before `-m`, or
with IET_AGC_PRELOAD=0."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

IDLE_SECONDS = 30
STARTUP_SECONDS = 120  # the longest a stage command waits for the libraries to load there
# What the stages import that takes seconds; any that is missing is left to the stage to report.
PRELOAD = ("torch", "torch.func", "safetensors.torch", "diffusers", "diffusers.models.unets.unet_2d",
           "diffusers.schedulers", "diffusers.training_utils", "diffusers.optimization",
           "diffusers.pipelines.ddpm", "mlflow", "mlflow.entities", "mlflow.models", "mlflow.data",
           "mlflow.system_metrics.system_metrics_monitor", "scipy.stats", "scipy.linalg", "scipy.optimize",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "PIL.Image")
# Environment variables read at import by Python or a preloaded library: a stage whose values
# differ gets a warm process of its own.
IMPORT_ENV = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "PYTORCH_", "CUDA_",
              "HF_", "HUGGINGFACE_", "DIFFUSERS_", "MLFLOW_", "MPL", "LD_", "IET_AGC")


def hand_over() -> None:
    """Run this stage command in the warm process and exit with its status. Return when no warm
    process can run it: this process then runs the stage itself (and starts one for the next)."""
    path = _socket_path() if _may_hand_over() else None
    if path is None:
        return
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        _start(path)
        return
    with conn:
        status = _run_there(conn)
    if status is not None:
        _exit_with(status)


def _may_hand_over() -> bool:
    """Whether this process is a plain `python -m stages.<name> ...` that may hand over."""
    argv = sys.orig_argv
    # torch loaded: this is a warm process's child, or someone imported it first
    return not (len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith("stages.") or "torch" in sys.modules
                or os.environ.get("IET_AGC_PRELOAD") == "0" or not sys.platform.startswith("linux")
                or "WORLD_SIZE" in os.environ or any(Path("/dev").glob("nvidia[0-9]*")))


def _socket_path() -> Path | None:
    """Where the warm process for this Python, folder and environment listens; None when the
    folder for it is another user's (then no process of theirs runs this user's stages)."""
    key = [sys.executable, os.getcwd(), sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_ENV))]
    folder = Path(tempfile.gettempdir()) / f"iet-agc-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        return None
    return folder / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24] + ".sock")


def _start(path: Path) -> None:
    import subprocess

    with open(path.with_suffix(".log"), "ab") as log:
        subprocess.Popen([sys.executable, "-m", "pipeline.core.preload", str(path)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True)


def _run_there(conn: socket.socket) -> int | None:
    """The child's wait status; None when the warm process closed before it started the stage."""
    request = {"orig_argv": sys.orig_argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path}
    conn.settimeout(STARTUP_SECONDS)  # a warm process stuck loading: run the stage here instead
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        replies = conn.makefile("r")
        started = replies.readline().split()
    except OSError:  # TimeoutError included
        return None
    if not started:
        return None
    conn.settimeout(None)
    pid = int(started[1])

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    ended = replies.readline().split()
    if not ended:
        print("the warm stage process (pipeline/core/preload.py) ended before the stage did; run again, "
              "or with IET_AGC_PRELOAD=0", file=sys.stderr)
        return 1 << 8
    return int(ended[1])


def _exit_with(status: int) -> None:
    if os.WIFSIGNALED(status):  # die of the same signal, as DVC would have seen the stage do
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    sys.exit(os.waitstatus_to_exitcode(status))


def serve_then_run(path: Path) -> None:
    """The warm process: serve until idle. In each forked child, run the stage it was handed."""
    request = _serve(path)
    _run_then_exit(request["orig_argv"][2])  # python -m <module> ...


def _run_then_exit(module: str) -> None:
    """Run the stage as `python -m` would and exit as it would, except that the modules are not
    torn down one by one: freeing torch's and MLflow's costs 2 s a process and does nothing a
    stage needs (its files are closed by then; atexit handlers, which end MLflow runs, still run)."""
    import atexit
    import runpy
    import threading
    import traceback

    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
        if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # Python ends by the signal itself
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    for thread in threading.enumerate():  # as Python waits for them at exit
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code is not None and code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit((code or 0) & 0xFF)


def _serve(path: Path) -> dict:
    """Accept stage commands until IDLE_SECONDS pass with none running; fork one child each. Never
    returns in the warm process (it exits); returns each child's request in that child."""
    import fcntl
    import importlib
    import select
    import time

    log = path.with_suffix(".log")  # its output, and locked while it serves
    lock = open(log, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os._exit(0)  # another warm process serves these stages
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(64)  # stage commands that come while the libraries load wait here
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a library that fails to import is the stage's to report
            pass
    held, children, last = _project_files(), {}, time.monotonic()
    while children or (listener.fileno() >= 0 and time.monotonic() - last < IDLE_SECONDS):
        waiting = [listener] if listener.fileno() >= 0 else []
        for ready in select.select(waiting + [fd for pair in children.values() for fd in pair], [], [], 1)[0]:
            if isinstance(ready, int):  # a child's pidfd: it has exited
                _reap(ready, children)
            elif ready is not listener:
                _end_if_gone(ready, children)
            elif _changed(held):  # a module of the project it holds was edited: let a fresh one serve
                listener.close()
                path.unlink(missing_ok=True)
            elif (request := _fork_for(listener, children)) is not None:
                lock.close()
                listener.close()
                return request
        if children:
            last = time.monotonic()
    path.unlink(missing_ok=True)
    if log.stat().st_size == 0:
        log.unlink()
    os._exit(0)  # not the atexit handlers of a stage: none ran here


def _fork_for(listener: socket.socket, children: dict) -> dict | None:
    """Accept one stage command and fork its child: in the child, its request; else None."""
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while message and not message.endswith(b"\n"):
            message += conn.recv(1 << 16)
        request = json.loads(message)
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:
        conn.close()
        for other, pidfd in children.values():
            other.close()
            os.close(pidfd)
        _become(request, fds)
        return request
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    children[pid] = (conn, os.pidfd_open(pid))
    return None


def _become(request: dict, fds: list[int]) -> None:
    """Make this child the stage command's process: its terminal, folder, environment, arguments."""
    import ctypes
    import random

    import setproctitle

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the warm process
    setproctitle.setproctitle(" ".join(request["orig_argv"]))  # ps and top show the stage, not this module
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = request["path"]
    sys.argv, sys.orig_argv = ["-m", *request["orig_argv"][3:]], request["orig_argv"]
    # new text streams on the handed-over files, buffered as Python buffers them at start-up
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
    random.seed()


def _end_if_gone(conn: socket.socket, children: dict) -> None:
    """The stage command closed its end (it was killed): kill its child too."""
    try:
        gone = conn.recv(1) == b""
    except OSError:
        gone = True
    pid = next((pid for pid, (c, _) in children.items() if c is conn), None)
    if gone and pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reap(pidfd: int, children: dict) -> None:
    """Tell the stage command its child's wait status."""
    pid = next(pid for pid, (_, fd) in children.items() if fd == pidfd)
    conn, _ = children.pop(pid)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    try:
        conn.sendall(f"status {status}\n".encode())
    except OSError:
        pass  # its command is gone
    conn.close()


def _project_files() -> dict[str, int]:
    """The files of the project's own modules this process imported (a test's probe may), by mtime."""
    here = os.getcwd() + os.sep
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    return {f: os.stat(f).st_mtime_ns for f in files if f and f.startswith(here)}


def _changed(held: dict[str, int]) -> bool:
    try:
        return any(os.stat(f).st_mtime_ns != mtime for f, mtime in held.items())
    except FileNotFoundError:
        return True


if __name__ == "__main__":
    serve_then_run(Path(sys.argv[1]))
