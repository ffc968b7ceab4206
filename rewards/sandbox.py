"""Run untrusted Python (model completions) in a jail that cannot hurt the trainer or the host, and the
code-execution reward built on it (pass rate of tests [01 §5.2]: code is rewarded by running it).

The jail is bubblewrap (`bwrap`), not a Python-level guard: an audit hook or a namespace set up by our own Python
code runs inside the process it is meant to contain, and a program can switch it off (issue 23). Bubblewrap rather
than nsjail because it is packaged by every major distribution (Debian/Ubuntu `bubblewrap`, Fedora, Arch), is
maintained as the sandbox of Flatpak (so its namespace set-up is exercised by millions of desktops and audited
often), runs unprivileged, and needs no config file: one command line per program. nsjail has cgroup limits
bwrap lacks, but is not packaged in Debian 12 and would be built from source on every machine.

What a program gets, per run (`_jail_argv`):
- Fresh user, mount, PID, network, IPC, UTS and cgroup namespaces (`--unshare-all --unshare-user`); no further
  user namespaces inside (`--disable-userns`), so it cannot regain capabilities in a nested one.
- uid/gid 65534 (nobody) inside, every capability dropped, no_new_privs (bwrap always sets it), its own session
  (no TIOCSTI into the trainer's terminal), killed when bwrap dies (`--die-with-parent`).
- A read-only view of only what the interpreter needs: `/usr` (with the merged-usr `/bin`, `/lib*` links) and the
  interpreter's own prefix when it lives elsewhere (a pyenv or conda Python; the directories above it are empty);
  no `/etc`, `/home`, `/run`, no sysfs; a fresh `/proc` of its own PID namespace (so no `/proc/<trainer pid>`),
  mounted read-only, and a minimal `/dev`, read-only. The root is remounted read-only too.
- One writable directory, the working directory `/tmp`: a tmpfs of `scratch_mb`. The job's files (`main.py`, ...)
  sit in it as read-only bind mounts, so a program cannot rewrite the harness or its tests.
- No network at all: the network namespace has only a loopback of its own (abstract Unix sockets are per network
  namespace too).
- A seccomp filter (`seccomp_filter`) refusing with EPERM what a Python program has no use for and a jail escape
  does: mount and friends, ptrace and process_vm_*, unshare/setns, keyrings, bpf, perf, userfaultfd, io_uring,
  kernel modules, kexec, reboot, open_by_handle_at (and the x32 ABI on x86_64).
- Limits set by `prlimit` just before the interpreter starts: CPU seconds, address space (memory), file size,
  open files, processes (per jail: Linux >= 5.14 counts RLIMIT_NPROC per user namespace), no core dumps. The
  parent enforces the wall-clock timeout and the output cap (it reads stdout/stderr through pipes and kills the
  jail at `max_output_kb`), then kills bwrap, which takes the whole PID namespace with it (setsid or double
  forks do not leave it).
- An environment of PATH, HOME, TMPDIR and LANG only: the trainer's variables never reach bwrap.

On the host the jail's processes belong to the trainer's uid, or to nobody when the trainer is root
(`_as_nobody`): never to root, whose processes Linux exempts from RLIMIT_NPROC (a fork bomb would be bounded by
the wall clock alone) and whose files and `/proc/sys` a uid-0 process could reach through any mount that is left
writable by mistake.

No unsafe fallback: `isolation="bwrap"` (the default) raises `JailUnavailable` (how to install bwrap) where bwrap
is missing or cannot create its namespaces. `isolation="none"` runs the program as a plain subprocess with the same
rlimits, timeout and output cap but no jail; for a trainer already inside a container it trusts, with a printed
warning. It does not contain the program: files, network, signals and processes left behind are all open to it.

What it does not promise: the reported test results are protected against accidental forgery and early exits (a
result line carries a random token the program is not given), not against a program that reads the token out of
the runner's memory (the tests run in its process). That is reward hacking inside the jail, not an escape from it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rewards.base import TESTS, RewardOutput, completion_text, reads

ISOLATIONS = ("bwrap", "none")
INSTALL_HINT = ("install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu; `make setup` does it), "
                "`dnf install bubblewrap` (Fedora/RHEL) or `pacman -S bubblewrap` (Arch); it also needs "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 where that exists; "
                "in Docker, a seccomp profile that allows them). Inside a container you already trust, set the code "
                "reward's `isolation: none` instead")
JAIL_UID = 65534  # nobody
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class JailUnavailable(OSError):
    """bwrap is missing or cannot start a jail here (an OSError: the machine lacks a facility)."""


@dataclass
class SandboxResult:
    returncode: int | None  # None when the parent killed it (timeout or output cap)
    stdout: str
    stderr: str
    timed_out: bool
    output_exceeded: bool  # stdout or stderr passed max_output_kb: killed there
    seconds: float
    isolation: str


# ---------------------------------------------------------------------------------------------------------------
# seccomp: a classic BPF program for bwrap's --seccomp (struct sock_filter {u16 code; u8 jt, jf; u32 k}), written
# out here because libseccomp's Python binding is not installable into a venv from PyPI.

_DENIED = ("mount umount2 pivot_root chroot unshare setns ptrace process_vm_readv process_vm_writev kexec_load "
           "kexec_file_load init_module finit_module delete_module bpf perf_event_open userfaultfd keyctl add_key "
           "request_key io_uring_setup io_uring_enter io_uring_register open_by_handle_at name_to_handle_at fsopen "
           "fsconfig fsmount fspick move_mount open_tree mount_setattr swapon swapoff reboot syslog acct quotactl "
           "lookup_dcookie vhangup").split()
# syscall numbers from the kernel's asm/unistd_64.h (x86_64) and asm-generic/unistd.h (aarch64), in _DENIED order
_SYSCALLS = {
    "x86_64": (0xC000003E, [165, 166, 155, 161, 272, 308, 101, 310, 311, 246, 320, 175, 313, 176, 321, 298, 323,
                            250, 248, 249, 425, 426, 427, 304, 303, 430, 431, 432, 433, 429, 428, 442, 167, 168,
                            169, 103, 163, 179, 212, 153]),
    "aarch64": (0xC00000B7, [40, 39, 41, 51, 97, 268, 117, 270, 271, 104, 294, 105, 273, 106, 280, 241, 282, 219,
                             217, 218, 425, 426, 427, 265, 264, 430, 431, 432, 433, 429, 428, 442, 224, 225, 142,
                             116, 89, 60, 18, 58]),
}
_X32_BIT = 0x40000000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _EPERM = 0x7FFF0000, 0x00050000 | 1


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The BPF filter for `machine` (default: this one), or None for an architecture without a table here (the
    jail then runs without seccomp; namespaces and the dropped capabilities still hold).

    >>> len(seccomp_filter("x86_64")) // 8  # arch check, x32 check, one jump per denied syscall, allow, deny
    46
    >>> seccomp_filter("riscv64") is None
    True
    """
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        return None
    arch, numbers = _SYSCALLS[machine]
    assert len(numbers) == len(_DENIED)
    head = [(_LD_ABS, 0, 0, 4)]  # seccomp_data.arch
    n_head = 3 + (machine == "x86_64")  # ld arch, jeq arch, ld nr, [jge x32]
    deny = n_head + len(numbers) + 1  # index of the deny instruction
    head.append((_JEQ, 0, deny - 2, arch))  # another ABI (i386 on x86_64): deny everything
    head.append((_LD_ABS, 0, 0, 0))  # seccomp_data.nr
    if machine == "x86_64":
        head.append((_JGE, deny - 4, 0, _X32_BIT))
    prog = head + [(_JEQ, deny - i - 1, 0, nr) for i, nr in enumerate(numbers, start=len(head))]
    prog += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


# ---------------------------------------------------------------------------------------------------------------
# The jail's command line


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _read_only_tree() -> list[str]:
    """bwrap arguments for the read-only system view: /usr, the merged-usr links (or directories) beside it, and
    the interpreter's prefix when it is outside /usr."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.realpath(sys.base_prefix)
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        # bwrap makes missing parents 0700 when it runs as root: the nobody of the inner jail could not pass them
        for parent in reversed(Path(prefix).parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    return args


def _limit_argv(timeout_s: float, memory_mb: int, file_kb: int, max_processes: int) -> list[str]:
    """prlimit + interpreter: the limits apply from the interpreter's first instruction, with no harness in it."""
    cpu = max(1, math.ceil(timeout_s))
    return ["/usr/bin/prlimit", f"--cpu={cpu}:{cpu + 1}", f"--as={memory_mb << 20}", f"--fsize={file_kb << 10}",
            "--nofile=64", "--core=0", f"--nproc={max_processes}", "--",
            _interpreter(), "-I", "-S", "-B", "main.py"]


def _as_nobody(bwrap: str) -> list[str]:
    """For a root trainer: an outer bwrap (root, mount namespace only) that shows the jail's read-only tree, so that
    the interpreter's prefix is reachable by nobody even under /root, then drops to nobody for the inner bwrap. The
    jail's processes are then kuid 65534 on the host, not root: RLIMIT_NPROC counts them (Linux never enforces it
    for a root-owned process, user namespace or not) and nothing of root's reaches them."""
    # the host /proc, not a fresh one: the kernel lets the inner user namespace mount its own proc only where a
    # fully visible one is already mounted
    return [bwrap, "--die-with-parent", *_read_only_tree(), "--bind", "/proc", "/proc", "--dev", "/dev",
            "--dir", "/tmp", "--", "/usr/bin/setpriv", f"--reuid={JAIL_UID}", f"--regid={JAIL_UID}", "--clear-groups",
            "--no-new-privs", "--"]


def _jail_argv(bwrap: str, scratch_mb: int, file_fds: dict[str, int], seccomp_fd: int | None,
               info_fd: int) -> list[str]:
    args = _as_nobody(bwrap) if os.geteuid() == 0 else []
    args += [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(JAIL_UID), "--gid",
            str(JAIL_UID), "--hostname", "jail", "--die-with-parent", "--new-session", "--clearenv",
             "--info-fd", str(info_fd)]  # {"child-pid": the jail's init}, for _kill to wait on
    for key, value in _ENV.items():
        args += ["--setenv", key, value]
    args += _read_only_tree()
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(scratch_mb << 20), "--tmpfs", "/tmp"]
    for name, fd in file_fds.items():
        args += ["--ro-bind-data", str(fd), f"/tmp/{name}"]
    args += ["--remount-ro", "/", "--remount-ro", "/proc", "--remount-ro", "/dev", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--"]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)  # pass_fds makes bwrap's copy inheritable, nothing else
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@lru_cache(maxsize=1)
def jail_check() -> str:
    """The path of bwrap after one real jailed run of a trivial program works here (cached: probed once per
    process); raises `JailUnavailable` saying why and how to install otherwise."""
    if sys.platform != "linux":
        raise JailUnavailable(f"the code reward's jail needs Linux (bubblewrap), not {sys.platform}; "
                              f"{INSTALL_HINT}")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise JailUnavailable(f"the code reward's jail tool bwrap was not found on PATH; {INSTALL_HINT}")
    for tool in ("prlimit", "setpriv"):  # limits; the drop to nobody under a root trainer
        if not os.path.exists(f"/usr/bin/{tool}"):
            raise JailUnavailable(f"the code reward's jail needs /usr/bin/{tool}: install util-linux")
    probe = _run("import os\nprint(os.getuid())", {}, "", bwrap, timeout_s=10.0, memory_mb=64, max_output_kb=64,
                 max_file_kb=64, scratch_mb=8, max_processes=8)
    if probe.returncode != 0 or probe.stdout.strip() != str(JAIL_UID):
        raise JailUnavailable(f"bwrap ({bwrap}) is installed but cannot start the jail here (exit "
                              f"{probe.returncode}: {probe.stderr.strip()[-300:] or 'no message'}); {INSTALL_HINT}")
    return bwrap


def run_sandboxed(code: str, files: dict[str, str] | None = None, stdin: str = "", timeout_s: float = 2.0,
                  memory_mb: int = 256, max_output_kb: int = 256, max_file_kb: int = 1024, scratch_mb: int = 16,
                  max_processes: int = 16, isolation: str = "bwrap") -> SandboxResult:
    """Run `code` as `main.py` (beside the read-only `files`, name -> text) in the working dir `/tmp` of a fresh
    jail (above), feeding it `stdin`.

    Limits: `timeout_s` wall clock (CPU seconds: the same, rounded up), `memory_mb` address space per process,
    `max_output_kb` each of stdout and stderr, `max_file_kb` per file written, `scratch_mb` for all of the
    writable dir, `max_processes` alive at once. `isolation`: "bwrap" (raises `JailUnavailable` where it cannot
    run) or "none" (no jail; see the module docstring). Never raises for anything the program does; the whole
    process tree is killed when it ends, times out or floods its output.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox isolation is {isolation!r}; expected one of {', '.join(ISOLATIONS)}")
    files = dict(files or {})
    for name in ["main.py", *files]:
        if not _FILE_NAME.fullmatch(name) or (name == "main.py" and name in files):
            raise ValueError(f"sandbox file name {name!r}: a plain file name other than main.py")
    bwrap = jail_check() if isolation == "bwrap" else None
    return _run(code, files, stdin, bwrap, timeout_s=timeout_s, memory_mb=memory_mb, max_output_kb=max_output_kb,
                max_file_kb=max_file_kb, scratch_mb=scratch_mb, max_processes=max_processes)


def _run(code: str, files: dict[str, str], stdin: str, bwrap: str | None, *, timeout_s: float, memory_mb: int,
         max_output_kb: int, max_file_kb: int, scratch_mb: int, max_processes: int) -> SandboxResult:
    """`run_sandboxed` after its checks: in the jail of `bwrap`, or unjailed when it is None."""
    files = {"main.py": code, **files}
    limits = _limit_argv(timeout_s, memory_mb, max_file_kb, max_processes)
    fds, workdir, info = [], None, None
    try:
        if bwrap is not None:
            file_fds = {name: _memfd(name, text.encode()) for name, text in files.items()}
            fds += file_fds.values()
            rules = seccomp_filter()
            seccomp_fd = None if rules is None else _memfd("seccomp", rules)
            if seccomp_fd is not None:
                fds.append(seccomp_fd)
            info, info_w = os.pipe()
            fds.append(info_w)
            argv, cwd, env = _jail_argv(bwrap, scratch_mb, file_fds, seccomp_fd, info_w) + limits, "/", {}
        else:
            workdir = tempfile.mkdtemp(prefix="reward-sandbox-")
            for name, text in files.items():
                Path(workdir, name).write_text(text)
            argv, cwd, env = limits, workdir, {**_ENV, "HOME": workdir, "TMPDIR": workdir}
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True)
        for fd in fds:  # bwrap has its copies
            os.close(fd)
        fds = []
        jail = bytearray()
        try:
            out, err, timed_out, flooded = _communicate(proc, stdin.encode(), start + timeout_s,
                                                        max_output_kb << 10, info, jail)
        finally:
            _kill(proc, jail)
        returncode = None if timed_out or flooded else proc.returncode
        return SandboxResult(returncode, out.decode(errors="replace"), err.decode(errors="replace"), timed_out,
                             flooded, time.monotonic() - start, "none" if bwrap is None else "bwrap")
    finally:
        for fd in fds + ([info] if info is not None else []):
            os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int, info: int | None,
                 jail: bytearray):
    """Feed stdin and read stdout/stderr (and bwrap's `info` fd into `jail`) until all close, the deadline passes,
    or either output passes `cap` bytes: (stdout, stderr, timed out, flooded), each output cut at `cap`."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    if info is not None:
        chunks[info] = jail
    sel = selectors.DefaultSelector()
    for stream in chunks:
        sel.register(stream, selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = flooded = False
    with sel:
        while len(sel.get_map()) and not flooded:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        data = data[os.write(proc.stdin.fileno(), data[:65536]):]
                    except BrokenPipeError:
                        data = b""
                    if not data:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = chunks[key.fileobj]
                buf += chunk
                flooded = flooded or (key.fileobj is not info and len(buf) > cap)
    return bytes(chunks[proc.stdout][:cap]), bytes(chunks[proc.stderr][:cap]), timed_out, flooded


def _kill(proc: subprocess.Popen, jail: bytes) -> None:
    """SIGKILL the child's process group and reap it. In the jail the group is bwrap's: its death kills the
    jail's init (--die-with-parent), and the kernel then kills every process of the PID namespace, after bwrap
    is gone: so wait for the init (its pid from bwrap's info, `jail`) to exit too, which it does only once the
    namespace is empty. Then nothing of the program is left when `run_sandboxed` returns."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    try:
        init = json.loads(bytes(jail))["child-pid"]
    except (ValueError, KeyError, TypeError):
        return  # killed before the jail was up: bwrap had no init to report
    try:
        pidfd = os.pidfd_open(init)
    except ProcessLookupError:
        return
    try:
        with selectors.DefaultSelector() as sel:  # a pidfd turns readable when its process has exited
            sel.register(pidfd, selectors.EVENT_READ)
            sel.select(5.0)
    finally:
        os.close(pidfd)


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
    """(pass rate, compiled, timed out) of `tests` (Python snippets, e.g. asserts) against `solution`, run by
    `run_sandboxed(**sandbox)`."""
    if not tests:
        raise ValueError("no tests to run")
    token = secrets.token_hex(16)
    result = run_sandboxed(_RUNNER, files={"solution.py": solution, "tests.json": json.dumps(tests)},
                           stdin=token + "\n", **sandbox)
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith(token + " ")]
    passed = {int(parts[2]) for parts in lines if len(parts) == 3 and parts[1] == "pass" and parts[2].isdigit()}
    compiled = any(parts[1:] == ["compiled"] for parts in lines)
    return len(passed & set(range(len(tests)))) / len(tests), compiled, result.timed_out


@reads({"tests": TESTS})
def code(timeout_s: float = 2.0, memory_mb: int = 256, workers: int = 4, isolation: str = "bwrap",
         max_processes: int = 16, scratch_mb: int = 16):
    """Pass rate of the per-sample `tests` field (a list of Python snippets, or one string) against the code in
    each completion (its last fenced block, else all of it), each run in its own jail, up to `workers` at once.

    `isolation: bwrap` (default) refuses to build where the jail cannot start (`JailUnavailable`, saying how to
    install bwrap); `isolation: none` runs without a jail and says so on stderr. Components: `code/compiled` (the
    solution ran without error), `code/timeout`.
    """
    if timeout_s <= 0 or memory_mb < 32 or workers < 1 or max_processes < 2 or scratch_mb < 1:
        raise ValueError(f"need timeout_s > 0, memory_mb >= 32, workers >= 1, max_processes >= 2, scratch_mb >= 1; "
                         f"got {timeout_s}, {memory_mb}, {workers}, {max_processes}, {scratch_mb}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"option 'isolation' is {isolation!r}; expected one of {', '.join(ISOLATIONS)}")
    if isolation == "bwrap":
        jail_check()
    else:
        print("warning: code reward with isolation: none runs model-written programs WITHOUT a jail (files, "
              "network, signals and leftover processes are open to them); use it only inside a container you "
              "trust", file=sys.stderr)
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation, max_processes=max_processes,
                  scratch_mb=scratch_mb)

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
