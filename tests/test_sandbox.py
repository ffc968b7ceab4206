"""The code-execution sandbox (rewards/sandbox.py) against malicious programs: infinite loop, fork bomb, writes
outside its dir, network calls, signals to the trainer, memory and output floods. Each case checks that the trainer
(this pytest process) survives, the program is stopped, and the temp dir is gone. Both isolation modes run where
the machine allows them; `audit_hook=False` checks the kernel layers (namespaces) on their own."""

import os
import socket
import time

import pytest

from rewards import build_reward
from rewards.sandbox import extract_code, namespaces_available, run_sandboxed, run_tests

MODES = ["audit", pytest.param("namespaces", marks=pytest.mark.skipif(
    not namespaces_available(), reason="unprivileged user/mount/net/pid namespaces unavailable"))]
needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="namespaces unavailable")


def _clean(result):
    assert not os.path.exists(result.workdir), "sandbox work dir left behind"


@pytest.mark.parametrize("mode", MODES)
def test_normal_program(mode):
    r = run_sandboxed("import sys\nprint(sys.stdin.read().upper())\nopen('scratch.txt', 'w').write('ok')",
                      stdin="hello", isolation=mode)
    assert (r.returncode, r.stdout.strip(), r.timed_out, r.isolation) == (0, "HELLO", False, mode)
    _clean(r)


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_killed(mode):
    start = time.monotonic()
    r = run_sandboxed("while True:\n    pass", timeout_s=1.0, isolation=mode)
    assert r.timed_out and r.returncode is None
    assert time.monotonic() - start < 5
    _clean(r)


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode):
    r = run_sandboxed("import os\nwhile True:\n    os.fork()", timeout_s=1.0, isolation=mode)
    assert r.returncode != 0 and "os.fork is not allowed" in r.stderr
    r = run_sandboxed("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", timeout_s=1.0,
                      isolation=mode)
    assert r.returncode != 0 and "not allowed" in r.stderr
    _clean(r)


@needs_namespaces
def test_process_tree_dies_with_the_sandbox_without_audit_hook():
    """Kernel layer alone: children that leave the process group (setsid) still die at the timeout."""
    marker = f"sandbox-orphan-{os.getpid()}-{time.monotonic_ns()}"
    code = (f"import os, time\nfor _ in range(5):\n    if os.fork() == 0:\n        os.setsid()\n"
            f"        os.execv('/bin/sleep', ['sleep', '30', '{marker}'])\ntime.sleep(30)")
    r = run_sandboxed(code, timeout_s=1.0, isolation="namespaces", audit_hook=False)
    assert r.timed_out
    time.sleep(0.2)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                leftovers.append(pid)
        except OSError:
            pass
    assert not leftovers, f"sandboxed processes survived: {leftovers}"
    _clean(r)


@pytest.mark.parametrize("mode", MODES)
def test_write_outside_its_dir(mode, tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.rename('main.py', {str(target)!r})",
                 f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w').write('x')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        r = run_sandboxed(code, isolation=mode)
        assert r.returncode != 0 and "not allowed" in r.stderr, (code, r.stderr)
        assert not target.exists() and tmp_path.is_dir()
        _clean(r)


@needs_namespaces
def test_read_only_filesystem_without_audit_hook(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_sandboxed(f"open('inside.txt', 'w').write('ok')\nopen({str(target)!r}, 'w').write('x')",
                      isolation="namespaces", audit_hook=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not target.exists()
    _clean(r)


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    return server


def _no_connection(server):
    try:
        server.accept()
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("mode", MODES)
def test_network_call(mode):
    server = _listener()
    port = server.getsockname()[1]
    r = run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')",
                      isolation=mode)
    assert r.returncode != 0 and "not allowed" in r.stderr
    assert _no_connection(server)
    server.close()
    _clean(r)


@needs_namespaces
def test_network_unreachable_without_audit_hook():
    server = _listener()
    port = server.getsockname()[1]
    r = run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                      isolation="namespaces", audit_hook=False)
    assert r.returncode != 0 and ("unreachable" in r.stderr or "refused" in r.stderr)
    assert _no_connection(server)
    server.close()


@pytest.mark.parametrize("mode", MODES)
def test_cannot_signal_the_trainer_or_flood(mode):
    r = run_sandboxed(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", isolation=mode)
    assert r.returncode != 0 and "os.kill is not allowed" in r.stderr  # and we are still here
    r = run_sandboxed("x = bytearray(4 * 1024**3)", memory_mb=128, isolation=mode)
    assert r.returncode != 0 and "MemoryError" in r.stderr
    r = run_sandboxed("while True:\n    print('y' * 4096)", max_output_kb=64, timeout_s=2.0, isolation=mode)
    assert len(r.stdout) <= 64 * 1024 and not r.timed_out  # RLIMIT_FSIZE stops the flood
    r = run_sandboxed("import ctypes\nctypes.CDLL(None).system(b'true')", isolation=mode)
    assert r.returncode != 0 and "not allowed" in r.stderr
    _clean(r)


def test_extract_code_and_run_tests():
    text = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(text) == "def add(a, b):\n    return a + b\n"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"]
    assert run_tests(extract_code(text), tests) == (pytest.approx(2 / 3), True, False)
    # a solution that forges result lines without the token gets nothing
    forged = "import sys\nfor i in range(3):\n    print('x pass', i)\ndef add(a, b):\n    return None"
    assert run_tests(forged, tests)[0] == 0.0


def test_code_reward_on_malicious_completions():
    reward = build_reward({"code": {"timeout_s": 1.0, "workers": 2}})
    tests = ["assert f(2) == 4", "assert f(3) == 9"]
    completions = ["```python\ndef f(x):\n    return x * x\n```",
                   "def f(x):\n    while True:\n        pass",
                   "import os\nos.fork()\ndef f(x):\n    return x * x",
                   "def f(x):\n    open('/etc/passwd', 'a').write('x')\n    return x * x",
                   "def f(x):\n    return x + 2"]
    out = reward(["p"] * 5, completions, tests=[tests] * 5)
    assert out.scores == [1.0, 0.0, 0.0, 0.0, 0.5]
    assert out.components["code/timeout"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert out.components["code/compiled"] == [1.0, 1.0, 0.0, 1.0, 1.0]
