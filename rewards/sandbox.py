"""Run untrusted Python (model completions) in a subprocess that cannot hurt the trainer, and the code-execution
reward built on it (pass rate of tests [01 §5.2]: code is rewarded by running it).

Layers, outermost first:

1. Linux namespaces, when `unshare` works (isolation="namespaces", the default where available): a new user,
   mount, network and PID namespace. The network namespace has no interfaces up, so every connection fails
   (ENETUNREACH) whatever the program does; every mount is remounted read-only except the work dir, so the kernel
   refuses writes anywhere else; the PID namespace dies with its first process, taking every descendant with it
   (also ones that called setsid() to leave the process group).
2. Resource limits in the child (setrlimit): CPU seconds, address space (memory), file size, open files, no core
   dumps, and RLIMIT_NPROC (not enforced by Linux for a process whose real uid is root: there the PID namespace and
   layer 3 contain fork bombs).
3. A Python audit hook (PEP 578) installed before the program runs and impossible to remove from Python: refuses
   process creation (fork, exec, spawn, subprocess, system), signals to other processes, sockets (no network),
   ctypes (which could bypass the hook), and opening for writing / deleting / renaming any
   path outside the work dir. Where namespaces are unavailable (isolation="audit") this is the filesystem and
   network barrier.
4. The parent: the child runs in its own session; on the wall-clock timeout the whole process group is killed
   with SIGKILL; output goes to files capped by RLIMIT_FSIZE (a program printing forever cannot fill the
   trainer's memory); the temp work dir is removed afterwards whatever happened.

What it does not promise: the reported test results are protected against accidental forgery (a result line
carries a random token the program is not given), not against a program that reads the harness's memory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rewards.base import RewardOutput, completion_text

# Runs in the child before the program: optional read-only remount, limits, audit hook, then the program.
_HARNESS = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
root = os.path.realpath(cfg["root"])

def fail(msg):
    sys.stderr.write("sandbox setup: " + msg + "\n"); sys.stderr.flush(); os._exit(97)

if cfg["readonly"]:
    import subprocess
    def unescape(s):
        return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    if subprocess.run(["mount", "--bind", root, root], capture_output=True).returncode:
        fail("cannot bind-mount the work dir")
    with open("/proc/self/mountinfo") as f:
        points = sorted({unescape(line.split()[4]) for line in f})
    for point in points:
        if point != root and subprocess.run(["mount", "-o", "remount,bind,ro", point],
                                            capture_output=True).returncode:
            fail("cannot make " + point + " read-only")
    del subprocess
    sys.modules.pop("subprocess", None)

for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.chdir(root)

WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
DENY = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.addressof", "os.chroot",
        "resource.setrlimit", "resource.prlimit"}
PATHS = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
         "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.chflags": 1}
NETWORK = cfg["network"]

def inside(path):
    if isinstance(path, int):
        return True
    full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
    return full == root or full.startswith(root + os.sep) or full == "/dev/null"

def hook(event, args):
    if event in DENY or (not NETWORK and event.startswith("socket.")):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and args[2] & WRITE and not inside(args[0]):
        raise PermissionError("sandbox: writing outside the work dir is not allowed: " + str(args[0]))
    n = PATHS.get(event)
    if n and not all(inside(p) for p in args[:n] if isinstance(p, (str, bytes, os.PathLike))):
        raise PermissionError("sandbox: " + event + " outside the work dir is not allowed")

if cfg["audit_hook"]:
    sys.addaudithook(hook)
del hook, cfg, fail
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed on timeout
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    workdir: str  # already removed; reported so that tests can check the clean-up
    isolation: str


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether unprivileged user+mount+net+pid namespaces work here (cached: probed once per process)."""
    if sys.platform != "linux" or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        probe = subprocess.run(_unshare_prefix() + ["true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _unshare_prefix() -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child"]


def _rmtree(path: str) -> None:
    """Remove the work dir even if the program made parts of it read-only."""

    def fix(func, p, _):
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    shutil.rmtree(path, onerror=fix)


def run_sandboxed(code: str, files: dict[str, str] | None = None, stdin: str = "", timeout_s: float = 2.0,
                  memory_mb: int = 256, max_output_kb: int = 256, max_processes: int = 16,
                  isolation: str = "auto", network: bool = False, audit_hook: bool = True) -> SandboxResult:
    """Run `code` as `main.py` (with extra `files`) in a fresh temp dir under the layers above.

    isolation: "auto" (namespaces if available, else the audit hook), "namespaces" (error if unavailable) or
    "audit". `audit_hook=False` leaves out layer 3 (only to test the outer layers on their own). Never raises for
    anything the program does; a timeout kills the whole process tree.
    """
    if isolation not in ("auto", "namespaces", "audit"):
        raise ValueError(f"sandbox isolation is {isolation!r}; expected auto, namespaces or audit")
    if isolation == "auto":
        isolation = "namespaces" if namespaces_available() else "audit"
    elif isolation == "namespaces" and not namespaces_available():
        raise RuntimeError("sandbox isolation 'namespaces' requested but unshare (user/mount/net/pid) is not "
                           "available here; use isolation: audit")
    workdir = tempfile.mkdtemp(prefix="reward-sandbox-")
    logs = tempfile.mkdtemp(prefix="reward-sandbox-out-")  # outside the work dir: the program cannot rewrite them
    start = time.monotonic()
    try:
        Path(workdir, "main.py").write_text(code)
        for name, text in (files or {}).items():
            Path(workdir, name).write_text(text)
        cpu = int(timeout_s) + 1
        cfg = {
            "root": workdir,
            "readonly": isolation == "namespaces",
            "network": network,
            "audit_hook": audit_hook,
            "limits": {"RLIMIT_CPU": cpu, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": max_output_kb << 10,
                       "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": max_processes},
        }
        argv = [sys.executable, "-I", "-S", "-c", _HARNESS, json.dumps(cfg)]
        if isolation == "namespaces":
            argv = _unshare_prefix() + argv
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        with open(Path(logs, "out"), "wb") as out, open(Path(logs, "err"), "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        read = lambda name: Path(logs, name).read_bytes()[: max_output_kb << 10].decode(errors="replace")  # noqa: E731
        return SandboxResult(None if timed_out else proc.returncode, read("out"), read("err"), timed_out,
                             time.monotonic() - start, workdir, isolation)
    finally:
        _rmtree(workdir)
        shutil.rmtree(logs, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the PID namespace takes the rest) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Code-execution reward

_CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)

# main.py for a code reward: runs the solution, then each test; one result line per passing test, flushed as it
# goes, so that a test that hangs still leaves the earlier passes counted.
_RUNNER = r"""
import json, sys
token = sys.stdin.readline().strip()
sys.stdin.close()
tests = json.load(open("tests.json"))
out = sys.__stdout__
def run():
    ns = {"__name__": "solution"}
    try:
        exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    except BaseException:
        return
    out.write(token + " compiled\n"); out.flush()
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "test_%d" % i, "exec"), ns)
        except BaseException:
            continue
        out.write(token + " pass %d\n" % i); out.flush()
run()
"""


def extract_code(text: str) -> str:
    """The last fenced code block of a completion, or the whole completion when it has none.

    >>> extract_code("Here:\\n```python\\ndef f(x):\\n    return x\\n```\\nDone.")
    'def f(x):\\n    return x\\n'
    """
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def run_tests(solution: str, tests: list[str], **sandbox) -> tuple[float, bool, bool]:
    """(pass rate, compiled, timed out) of `tests` (Python snippets, e.g. asserts) against `solution`."""
    if not tests:
        raise ValueError("no tests to run")
    token = secrets.token_hex(16)
    result = run_sandboxed(_RUNNER, files={"solution.py": solution, "tests.json": json.dumps(tests)},
                           stdin=token + "\n", **sandbox)
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith(token + " ")]
    passed = {int(parts[2]) for parts in lines if len(parts) == 3 and parts[1] == "pass" and parts[2].isdigit()}
    compiled = any(parts[1:] == ["compiled"] for parts in lines)
    return len(passed & set(range(len(tests)))) / len(tests), compiled, result.timed_out


def code(timeout_s: float = 2.0, memory_mb: int = 256, workers: int = 4, isolation: str = "auto"):
    """Pass rate of the per-sample `tests` field (a list of Python snippets, or one string) against the code in
    each completion (its last fenced block, else all of it), each run in its own sandbox.

    Components: `code/compiled` (the solution ran without error), `code/timeout`.
    """
    if timeout_s <= 0 or memory_mb < 32 or workers < 1:
        raise ValueError(f"need timeout_s > 0, memory_mb >= 32, workers >= 1; got {timeout_s}, {memory_mb}, "
                         f"{workers}")
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)

    def code(prompts, completions, **fields) -> RewardOutput:
        if fields.get("tests") is None:
            raise KeyError("needs the per-sample field 'tests' (a list of Python test snippets per sample)")
        tests = [[t] if isinstance(t, str) else list(t) for t in fields["tests"]]
        jobs = [(extract_code(completion_text(c)), t) for c, t in zip(completions, tests)]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # each job waits on a subprocess: threads suffice
            results = list(pool.map(lambda job: run_tests(*job, **limits), jobs))
        scores = [r[0] for r in results]
        return RewardOutput(scores, {"code": scores, "code/compiled": [float(r[1]) for r in results],
                                     "code/timeout": [float(r[2]) for r in results]})

    return code
