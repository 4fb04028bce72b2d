"""The warm process (pipeline/core/preload.py) that runs stage commands after importing torch once: a
stage handed to it sees its own arguments, folder, environment and files, and its command ends as
the stage does (status, signal); Ctrl-C/SIGTERM reach the stage, and a killed command leaves no
stage running. Driven with stand-in `stages.*` modules in a folder of their own, so that each case
controls what its stage does."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGES = {
    "__init__.py": "from pipeline.core.preload import hand_over\nhand_over()\n",
    # what the stage process is: whether torch was imported before it ran, and what it was handed
    "echo.py": """
import json, os, sys
warm = "torch" in sys.modules
print(json.dumps({"warm": warm, "pid": os.getpid(), "args": sys.argv[1:], "cwd": os.getcwd(),
                  "env": os.environ.get("STAGE_VALUE"), "stdin": sys.stdin.read()}), flush=True)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""",
    "fail.py": "raise RuntimeError('the stage failed')\n",
    # waits to be signalled; says so on SIGTERM, as the real stages' handler does
    "wait.py": """
import os, signal, sys, time
def term(signum, frame):
    os.write(1, b"terminated\\n")  # not print: the signal may come while print(pid) flushes
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
print(os.getpid(), flush=True)
time.sleep(120)
""",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _served(tmp_path_factory.mktemp("warm"))


def _served(root):
    """A folder with stand-in stages and a warm process serving it (started by the first command)."""
    (root / "stages").mkdir()
    for name, code in STAGES.items():
        (root / "stages" / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STAGE_VALUE": "handed"}
    env.pop("IET_AGC_PRELOAD", None)
    deadline = time.monotonic() + 120
    while not _run(root, env, "echo")[0]["warm"]:  # the first runs itself and starts the warm process
        assert time.monotonic() < deadline, "no warm process served the stage"
        time.sleep(1)
    return root, env


def _run(root, env, stage, *args, stdin=""):
    out = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=root, env=env, input=stdin,
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    return (json.loads(lines[0]) if lines and lines[0].startswith("{") else None), out


def test_a_stage_in_the_warm_process_gets_its_arguments_folder_environment_and_files(folder):
    root, env = folder
    seen, out = _run(root, env, "echo", "3", "--flag", stdin="from stdin")
    assert seen["warm"] and seen["pid"] != os.getpid()
    assert seen["args"] == ["3", "--flag"] and seen["cwd"] == str(root) and seen["env"] == "handed"
    assert seen["stdin"] == "from stdin" and out.stderr == "to stderr\n"
    assert out.returncode == 3


def test_a_stage_that_raises_ends_its_command_with_its_traceback_and_status_1(folder):
    root, env = folder
    _, out = _run(root, env, "fail")
    assert out.returncode == 1 and "RuntimeError: the stage failed" in out.stderr
    cold = subprocess.run([sys.executable, "-m", "stages.fail"], cwd=root, env={**env, "IET_AGC_PRELOAD": "0"},
                          capture_output=True, text=True, timeout=60)
    assert (cold.returncode, cold.stderr.splitlines()[-1]) == (1, out.stderr.splitlines()[-1])


def _started(root, env):
    proc = subprocess.Popen([sys.executable, "-m", "stages.wait"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_sigterm_to_the_command_reaches_the_stage(folder):
    proc, stage_pid = _started(*folder)
    assert stage_pid != proc.pid  # the warm process's child, not the command, shown as the command
    assert Path(f"/proc/{stage_pid}/cmdline").read_text().replace("\0", " ").split()[1:] == ["-m", "stages.wait"]
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.read() == "terminated\n" and proc.wait(30) == 143


def test_a_killed_command_leaves_no_stage_running(folder):
    proc, stage_pid = _started(*folder)
    proc.kill()
    proc.wait(30)
    deadline = time.monotonic() + 30
    while _alive(stage_pid):
        assert time.monotonic() < deadline, f"stage process {stage_pid} still runs after its command was killed"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_warm_process_ends_its_commands_with_a_message_and_their_stages(tmp_path):
    root, env = _served(tmp_path)  # a warm process of its own: this one is killed
    proc, stage_pid = _started(root, env)
    warm_pid = int(Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    sock = Path(Path(f"/proc/{warm_pid}/cmdline").read_text().split("\0")[3])
    os.kill(warm_pid, signal.SIGKILL)
    assert proc.wait(30) == 1 and "ended before the stage did" in proc.stderr.read()
    deadline = time.monotonic() + 30
    while _alive(stage_pid):
        assert time.monotonic() < deadline, "the stage outlived the warm process"
        time.sleep(0.1)
    for left in (sock, sock.with_suffix(".log")):  # what a killed warm process cannot remove itself
        left.unlink(missing_ok=True)
