"""The code-execution jail (rewards/sandbox.py) against hostile programs, and the code reward on honest ones.

Every attack is a solution whose `f()` attempts the attack and returns True when it went through, scored by the
test `assert f()`: it must score 0, finish inside its limits, and leave the host unchanged, which each test checks
from outside the jail with evidence that would exist had the attack worked (a marker file, a connection accepted
by a listener of this test, a surviving pid, a victim process killed). `test_detectors_see_the_attacks_unjailed`
runs the attacks that are safe to run without a jail (writes into this test's tmp dir, its listeners, its victim
process, leftover processes) under `isolation="none"` and asserts that the same evidence then appears: those checks
can fail, and those attacks work. The others would harm the host unjailed (remounting /usr, signalling the trainer,
bombs and hogs); their checks look for what a hit leaves: a file in the host's /usr, a dead trainer or victim, a
fork count above `max_processes`, a run past its limits, a score of 1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rewards import RewardError, build_reward
from rewards.sandbox import JailUnavailable, extract_code, jail_check, run_sandboxed, run_tests

try:
    jail_check()
    NO_JAIL = None
except JailUnavailable as err:
    NO_JAIL = str(err)
jailed = pytest.mark.skipif(NO_JAIL is not None, reason=f"no jail here: {NO_JAIL}")


def score(body: str, isolation: str = "bwrap", **limits) -> tuple[float, bool]:
    """(score, timed out) of a solution whose f() runs `body` (dedented) and returns its `ok`."""
    solution = "def f():\n    ok = False\n" + textwrap.indent(textwrap.dedent(body), "    ") + "\n    return ok\n"
    rate, _, timed_out = run_tests(solution, ["assert f() is True"], isolation=isolation, **limits)
    return rate, timed_out


def pids_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            pass
    return found


class Target:
    """What the attacks aim at, and the host-side evidence of a hit."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.marker = str(tmp_path / "escaped")
        self.tag = f"jail-test-{os.getpid()}-{time.monotonic_ns()}"
        self.victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.unix_path = str(tmp_path / "sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.abstract_name = "\0" + self.tag
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        for s in (self.tcp, self.unix, self.abstract):
            s.listen(8)
            s.setblocking(False)

    def fmt(self, body: str) -> str:
        return body.format(marker=self.marker, dir=str(self.dir), tag=self.tag, victim=self.victim.pid,
                           port=self.tcp.getsockname()[1], unix=self.unix_path, abstract=self.abstract_name,
                           trainer=os.getpid(), trainer_group=os.getpgrp())

    def connections(self) -> int:
        n = 0
        for s in (self.tcp, self.unix, self.abstract):
            try:
                while True:
                    s.accept()[0].close()
                    n += 1
            except BlockingIOError:
                pass
        return n

    def close(self):
        self.victim.kill()
        self.victim.wait()
        for s in (self.tcp, self.unix, self.abstract):
            s.close()
        for pid in pids_with(self.tag):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def target(tmp_path):
    t = Target(tmp_path)
    yield t
    t.close()


FORK_EXEC = """
import _posixsubprocess
r, w = os.pipe()
pid = _posixsubprocess.fork_exec([b"/bin/sh", b"-c", CMD], [b"/bin/sh"], True, (w,), None, None, -1, -1, -1, -1,
                                 -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)
os.waitpid(pid, 0)
"""

# name -> (body of f, what a hit leaves on the host). Each body sets ok = True when its attack went through.
WRITES = {
    "open": "open({marker!r}, 'w').write('x'); ok = True",
    "dir_fd": "import os\nd = os.open({dir!r}, os.O_RDONLY)\n"
              "os.close(os.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=d)); ok = True",
    "sqlite3": "import sqlite3\nc = sqlite3.connect({marker!r})\nc.execute('create table t (x)'); c.commit()\n"
               "ok = True",
    "fork_exec": "import os\nCMD = b'echo x > {marker}'\n" + FORK_EXEC + "ok = os.path.exists({marker!r})",
    "os.system": "import os\nos.system('echo x > {marker}'); ok = os.path.exists({marker!r})",
    "subprocess": "import subprocess, os\nsubprocess.run(['sh', '-c', 'echo x > {marker}']); "
                  "ok = os.path.exists({marker!r})",
}
NETWORK = {
    "tcp": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x'); ok = True",
    "unix": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({unix!r}); ok = True",
    "abstract": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract!r}); ok = True",
}
SIGNALS = {
    "kill": "import os, signal, time\nos.kill({victim}, signal.SIGKILL); time.sleep(0.2)\n"
            "ok = not os.path.exists('/proc/{victim}') or open('/proc/{victim}/stat').read().split()[2] == 'Z'",
    "pidfd_send_signal": "import os, signal\nfd = os.pidfd_open({victim})\n"
                         "signal.pidfd_send_signal(fd, signal.SIGKILL); ok = True",
    "killpg": "import os, signal\nos.killpg(os.getpgid({victim}), signal.SIGKILL); ok = True",
}
SECRET = "reads-the-trainers-env-" + "7f3a9c"  # built here so that no command line of this test holds it whole
READ_PARENT = """
import os
seen = ''.join(f'{{k}}={{v}}' for k, v in os.environ.items())
for pid in [str(os.getppid()), str({trainer}), '1'] + [p for p in os.listdir('/proc') if p.isdigit()]:
    for name in ('environ', 'cmdline'):
        try:
            seen += open('/proc/%s/%s' % (pid, name), 'rb').read().decode(errors='replace')
        except OSError:
            pass
ok = SECRET in seen
"""
LEFT_BEHIND = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # double fork: the grandchild is nobody's child
            for fd in range(3):
                os.close(fd)
            os.execv('/usr/bin/sleep', ['{tag}', '30'])
        os._exit(0)
time.sleep(0.3)
ok = True
"""


@jailed
@pytest.mark.parametrize("name", WRITES)
def test_writes_outside_the_scratch_dir(target, name):
    start = time.monotonic()
    assert score(target.fmt(WRITES[name])) == (0.0, False)
    assert time.monotonic() - start < 3
    assert not os.path.exists(target.marker)


@jailed
def test_remount_and_write_the_read_only_tree(target):
    """Remount the read-only /usr (shell mount, the mount syscall through ctypes, a fresh tmpfs), then write into
    it; the host's /usr must be unchanged."""
    marker = f"/usr/lib/{target.tag}"
    body = f"""
    import ctypes, os
    for cmd in ('mount -o remount,rw /usr', 'mount -o remount,bind,rw /usr', 'mount -o remount,rw /',
                'umount -l /usr'):
        os.system(cmd + ' 2>/dev/null')
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount(b'none', b'/usr', None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
    libc.mount(b'tmpfs', b'/usr/lib', b'tmpfs', 0, None)
    try:
        open({marker!r}, 'w').write('x'); ok = True
    except OSError:
        pass
    """
    assert score(body) == (0.0, False)
    assert not os.path.exists(marker)


@jailed
@pytest.mark.parametrize("name", NETWORK)
def test_network(target, name):
    assert score(target.fmt(NETWORK[name])) == (0.0, False)
    assert target.connections() == 0


@jailed
@pytest.mark.parametrize("name", SIGNALS)
def test_signals_to_another_process(target, name):
    assert score(target.fmt(SIGNALS[name])) == (0.0, False)
    assert target.victim.poll() is None, "the victim process was killed from inside the jail"


@jailed
def test_signals_to_the_trainer_and_its_group(target):
    """The trainer (this pytest process), its group, its parent and everyone: had any got through, this test would
    not be here to report it (or the victim would be dead)."""
    body = target.fmt("""
    import os, signal
    for pid in ({trainer}, os.getppid(), 1):
        for send in (lambda: os.kill(pid, signal.SIGTERM), lambda: os.killpg(pid, signal.SIGTERM),
                     lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGTERM)):
            try:
                send()
            except OSError:
                pass
    os.killpg({trainer_group}, signal.SIGTERM)
    """)
    assert score(body) == (0.0, False)
    assert target.victim.poll() is None


@jailed
def test_reading_the_trainers_environment(tmp_path):
    """A trainer started with a secret in its environment (as HF_TOKEN would be) runs an attack that reads its own
    environment and /proc/<ppid>/, /proc/<trainer>/, /proc/*/ environ and cmdline."""
    score_both = ("import json, os, sys\nsys.path.insert(0, {root!r})\nfrom tests.test_sandbox import READ_PARENT, "
                  "score\nbody = READ_PARENT.format(trainer=os.getpid()).replace('SECRET', repr(sys.argv[1][::-1]))\n"
                  "print(json.dumps([score(body, isolation=m)[0] for m in ('bwrap', 'none')]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": os.environ["PATH"], "TRAINER_SECRET": SECRET}
    # argv carries the secret reversed, so that only the environment holds it
    out = subprocess.run([sys.executable, "-c", score_both.format(root=root), SECRET[::-1]], env=env, cwd=root,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    jailed_score, unjailed_score = eval(out.stdout.strip().splitlines()[-1])
    assert jailed_score == 0.0
    assert unjailed_score == 1.0, "the attack should find the secret without a jail: the check is blind"


@jailed
def test_processes_left_behind(target):
    """setsid + double fork grandchildren that outlive the program: the PID namespace takes them when it ends (not
    only at a timeout: here the program exits at once)."""
    r = run_sandboxed(target.fmt(LEFT_BEHIND).replace("ok = True", "print('forked')"), timeout_s=5.0)
    assert (r.returncode, r.stdout.strip(), r.timed_out) == (0, "forked", False)
    time.sleep(0.3)
    assert pids_with(target.tag) == [], "sandboxed processes survived"


@jailed
def test_jailed_processes_are_not_root_on_the_host(target):
    """Seen from the host, a jailed process belongs to nobody when the trainer is root (else to the trainer), and
    is gone once the run returns."""
    import threading
    code = target.fmt("import os\nos.execv('/usr/bin/sleep', ['{tag}', '2'])")
    run = threading.Thread(target=run_sandboxed, args=(code,), kwargs={"timeout_s": 1.0})
    run.start()
    for _ in range(100):
        pids = pids_with(target.tag)
        if pids:
            break
        time.sleep(0.01)
    assert pids, "the jailed sleep never showed up"
    assert os.stat(f"/proc/{pids[0]}").st_uid == (65534 if os.geteuid() == 0 else os.geteuid())
    run.join()
    assert pids_with(target.tag) == []


@jailed
def test_detectors_see_the_attacks_unjailed(target, capsys):
    """The same attacks without a jail (only those that are safe to run so: they hit this test's own marker,
    listeners and victim) leave the evidence the jailed tests look for."""
    for name, body in WRITES.items():
        assert score(target.fmt(body), isolation="none")[0] == 1.0, name
        assert os.path.exists(target.marker), name
        os.remove(target.marker)
    for name, body in NETWORK.items():
        assert score(target.fmt(body), isolation="none")[0] == 1.0, name
        assert target.connections() >= 1, name
    for name, body in SIGNALS.items():
        assert score(target.fmt(body), isolation="none")[0] == 1.0, name
        assert target.victim.poll() is not None, name
        target.victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    r = run_sandboxed(target.fmt(LEFT_BEHIND), isolation="none")
    assert r.returncode == 0
    assert len(pids_with(target.tag)) == 3  # the fixture kills them


@jailed
def test_fork_bombs_are_bounded(target):
    """A Python fork loop counts how many children it gets (each execs a marked sleep), and a shell fork bomb runs
    beside it; both end at the timeout with at most max_processes processes and none left."""
    body = target.fmt("""
    import os, sys
    n = 0
    while n < 10000:
        try:
            if os.fork() == 0:
                os.execv('/usr/bin/sleep', ['{tag}', '30'])
        except OSError:
            break
        n += 1
    print('forks', n, file=sys.stderr)
    ok = n >= 100
    """)
    start = time.monotonic()
    r = run_sandboxed("exec(open('solution.py').read())\nf()\nimport time\ntime.sleep(30)",
                      files={"solution.py": "def f():\n" + textwrap.indent(textwrap.dedent(body), "    ")},
                      timeout_s=1.5, max_processes=16)
    assert r.timed_out and time.monotonic() - start < 4
    forks = int(r.stderr.split("forks")[1].split()[0])
    assert 0 < forks < 16
    assert score(body, max_processes=16) == (0.0, False)
    start = time.monotonic()
    bomb = "import subprocess, time\nsubprocess.run(['sh', '-c', 'b() {{ b | b & }}; b # {tag}'])\ntime.sleep(30)"
    shell = run_sandboxed(target.fmt(bomb), timeout_s=1.5)
    assert shell.timed_out and time.monotonic() - start < 4
    time.sleep(0.2)
    assert pids_with(target.tag) == []


@jailed
def test_a_fork_bomb_does_not_starve_its_neighbours():
    """RLIMIT_NPROC counts per jail (per user namespace): a bomb in one worker leaves the others their processes."""
    reward = build_reward({"code": {"timeout_s": 1.5, "workers": 3}})
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    forker = ("import subprocess\ndef f(x):\n"
              "    return int(subprocess.run(['echo', str(x * x)], capture_output=True).stdout)")
    out = reward(["p"] * 3, [bomb, forker, forker], tests=[["assert f(3) == 9"]] * 3)
    assert out.scores == [0.0, 1.0, 1.0]


@jailed
def test_memory_disk_and_output_hogs():
    start = time.monotonic()
    assert score("x = bytearray(1 << 30); ok = True", memory_mb=128) == (0.0, False)
    assert score("x = []\nwhile len(x) < 4096:\n    x.append(bytearray(1 << 20))\nok = True", memory_mb=128) == \
        (0.0, False)
    # disk: one big file (max_file_kb), then many files against the scratch size, then outside the scratch dir
    disk = """
    import os
    total = 0
    for path in ['big'] + ['f%d' % i for i in range(200)] + ['/dev/shm/x', '/x', '/proc/x']:
        try:
            with open(path, 'wb') as out:
                for _ in range(64):
                    out.write(b'x' * (1 << 20)); out.flush(); total += 1 << 20
        except OSError:
            pass
    print('wrote', total)
    ok = total > 16 << 20
    """
    assert score(disk, scratch_mb=16) == (0.0, False)
    r = run_sandboxed("exec(open('d.py').read())", files={"d.py": "ok = False\n" + textwrap.dedent(disk)},
                      scratch_mb=16, max_file_kb=4096)
    assert 0 < int(r.stdout.split()[1]) <= 16 << 20
    big = run_sandboxed("import os\ntry:\n    open('big', 'wb').write(b'x' * (8 << 20))\nexcept OSError as e:\n"
                        "    print(e.errno)\nprint(os.path.getsize('big'))", max_file_kb=1024)
    assert big.stdout.split() == ["27", str(1 << 20)]  # EFBIG at max_file_kb
    flood = run_sandboxed("while True:\n    print('y' * 4096)", max_output_kb=64, timeout_s=5.0)
    assert flood.output_exceeded and not flood.timed_out and flood.returncode is None
    assert len(flood.stdout) == 64 << 10
    assert time.monotonic() - start < 8  # the flood is cut at its cap, not at its timeout


@jailed
def test_infinite_loops_end_at_the_timeout():
    start = time.monotonic()
    r = run_sandboxed("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.returncode is None and time.monotonic() - start < 2.5
    assert score("while True:\n    pass", timeout_s=1.0) == (0.0, True)


@jailed
def test_limits_in_force_inside():
    """The rlimits the program runs under, and the rest of its view: uid, capabilities, no_new_privs, seccomp,
    the environment, the mounts."""
    r = run_sandboxed(textwrap.dedent("""
        import json, os, resource
        names = ['CPU', 'AS', 'FSIZE', 'NOFILE', 'NPROC', 'CORE']
        status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
        print(json.dumps({'limits': {n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in names},
                          'ids': [os.getuid(), os.getgid(), os.getpid()], 'env': dict(os.environ),
                          'status': {k: status[k].strip() for k in ('CapEff', 'CapBnd', 'NoNewPrivs', 'Seccomp')},
                          'root': sorted(os.listdir('/')), 'cwd': os.getcwd(), 'host': os.uname().nodename}))
    """), timeout_s=2.5, memory_mb=200, max_file_kb=300, max_processes=7)
    got = json.loads(r.stdout)
    assert got["limits"] == {"CPU": [3, 4], "AS": [200 << 20] * 2, "FSIZE": [300 << 10] * 2, "NOFILE": [64, 64],
                             "NPROC": [7, 7], "CORE": [0, 0]}
    assert got["ids"] == [65534, 65534, 2]
    assert got["env"] == {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PWD": "/tmp"}
    assert got["status"]["CapEff"] == "0000000000000000" and got["status"]["NoNewPrivs"] == "1"
    assert got["status"]["Seccomp"] == "2"  # filter mode
    assert set(got["root"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "root", "sbin", "tmp",
                                "usr", "opt", "home"}
    assert "etc" not in got["root"] and got["cwd"] == "/tmp" and got["host"] == "jail"


TAMPER = {
    # the runner's files are read-only bind mounts: rewrite, replace, unmount
    "rewrite tests": "open('tests.json', 'w').write('[]'); ok = True",
    "replace runner": "import os\nopen('x', 'w').write('print(1)')\nos.rename('x', 'main.py'); ok = True",
    "umount": "import ctypes\nok = ctypes.CDLL(None).umount2(b'/tmp/tests.json', 2) == 0",
    # limits: raise them back, or kill the jail's init (its reaper) to orphan the process tree
    "raise limits": "import resource\nfor r in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU):\n"
                    "    resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\nok = True",
    "kill init": "import os, signal\nos.kill(1, signal.SIGKILL)\nimport time; time.sleep(0.2)\n"
                 "ok = not os.path.exists('/proc/1')",
    # the runner's process: ptrace it, write its memory
    "ptrace": "import ctypes\nok = ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0",  # PTRACE_ATTACH to init
    "write memory": "open('/proc/1/mem', 'wb'); ok = True",
    "new user namespace": "import ctypes\nok = ctypes.CDLL(None).unshare(0x10000000) == 0",  # CLONE_NEWUSER
    # forge the result lines: without the token, or by leaving before the tests run
    "forged lines": "import sys\nfor i in range(3):\n    print('x pass', i)\n"
                    "    sys.__stdout__.write('pass %d\\n' % i)",
    "exit early": "import os\nos._exit(0)",
}


@jailed
@pytest.mark.parametrize("name", TAMPER)
def test_tampering_with_the_harness(name):
    assert score(TAMPER[name]) == (0.0, False)


@jailed
def test_known_good_and_wrong_solutions():
    """Honest solutions with their tests (stdlib imports, classes, recursion, stdin-free I/O in the scratch dir,
    subprocesses) score 1, wrong ones 0; run concurrently through the code reward."""
    problems = [
        ("def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
         ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
        ("import functools\n@functools.lru_cache(None)\ndef fib(n):\n"
         "    return n if n < 2 else fib(n - 1) + fib(n - 2)",
         "def fib(n):\n    return n",
         ["assert fib(10) == 55", "assert fib(50) == 12586269025"]),
        ("import re\ndef words(s):\n    return re.findall(r'[a-z]+', s.lower())",
         "def words(s):\n    return s.split()",
         ["assert words('Hi, you!') == ['hi', 'you']"]),
        ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
         "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()",
         "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
         "        self.items.append(x)\n    def pop(self):\n        return self.items.pop(0)",
         ["s = Stack(); s.push(1); s.push(2); assert s.pop() == 2"]),
        ("import json\ndef roundtrip(x):\n    open('x.json', 'w').write(json.dumps(x))\n"
         "    return json.load(open('x.json'))",
         "def roundtrip(x):\n    return str(x)",
         ["assert roundtrip({'a': [1, 2]}) == {'a': [1, 2]}"]),
        ("import subprocess\ndef shout(s):\n    return subprocess.run(['tr', 'a-z', 'A-Z'], input=s, text=True,"
         " capture_output=True).stdout",
         "def shout(s):\n    return s",
         ["assert shout('abc') == 'ABC'"]),
        ("import heapq\ndef k_smallest(xs, k):\n    return heapq.nsmallest(k, xs)",
         "def k_smallest(xs, k):\n    return sorted(xs, reverse=True)[:k]",
         ["assert k_smallest([5, 1, 4, 2], 2) == [1, 2]", "assert k_smallest([3, 1, 2], 1) == [1]"]),
    ]
    reward = build_reward({"code": {"workers": 4}})
    fence = "```python\n{}\n```"
    completions = [fence.format(good) for good, _, _ in problems] + [fence.format(bad) for _, bad, _ in problems]
    tests = [t for _, _, t in problems] * 2
    out = reward(["p"] * len(completions), completions, tests=tests)
    assert out.scores == [1.0] * len(problems) + [0.0] * len(problems)
    assert out.components["code/compiled"] == [1.0] * len(completions)


@jailed
def test_extract_code_and_partial_credit():
    text = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(text) == "def add(a, b):\n    return a + b\n"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"]
    assert run_tests(extract_code(text), tests) == (pytest.approx(2 / 3), True, False)
    reward = build_reward({"code": {"timeout_s": 1.0, "workers": 2}})
    out = reward(["p"] * 3, ["def f(x):\n    return x + 2", "def f(x):\n    while True:\n        pass",
                             "syntax error("], tests=[["assert f(2) == 4", "assert f(3) == 9"]] * 3)
    assert out.scores == [0.5, 0.0, 0.0]
    assert out.components["code/timeout"] == [0.0, 1.0, 0.0]
    assert out.components["code/compiled"] == [1.0, 1.0, 0.0]


def test_no_jail_no_reward(monkeypatch, capsys):
    """Without bwrap the code reward refuses to build, with one error that names the reward and says how to
    install it; `isolation: none` builds with a warning; a bad isolation value is an error naming the option."""
    jail_check.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        with pytest.raises(RewardError, match=r"reward 'code': .*bwrap was not found.*apt-get install bubblewrap"):
            build_reward({"code": {}})
        with pytest.raises(JailUnavailable):
            run_sandboxed("print(1)")
    finally:
        jail_check.cache_clear()
    build_reward({"code": {"isolation": "none"}})
    assert "WITHOUT a jail" in capsys.readouterr().err
    with pytest.raises(RewardError, match=r"reward 'code': option 'isolation' is 'audit'; expected one of bwrap"):
        build_reward({"code": {"isolation": "audit"}})
