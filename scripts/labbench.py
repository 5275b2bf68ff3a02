"""Building blocks of the benchmarks on the network lab of scripts/lab.sh.

Shared by scripts/fanout_bench.py and scripts/links_bench.py: bringing the lab
up and down, running commands in the controller's namespace (timed, in their
own process group), the controller link's byte counter, the machine's CPU
load, seeded random images, byte-for-byte checks of targets.
"""

import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(REPO, "scripts", "lab.sh")
CTL = "imgctl"
LAB_DIR = os.environ.get("LAB_DIR") or os.path.join(
    os.environ.get("TMPDIR") or "/tmp", "imaging-lab"
)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rate_bytes(rate):
    """A tc rate in bits (100mbit) -> bytes per second."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(bit|kbit|mbit|gbit)", rate.lower())
    if not m:
        sys.exit(f"rate {rate!r}: expected a number and bit, kbit, mbit or gbit (e.g. 100mbit)")
    mult = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]
    return float(m.group(1)) * mult / 8


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def catch_signals():
    """SIGTERM and SIGHUP unwind like Ctrl-C, so `finally` tears the lab down."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def lab(*args, env=None):
    subprocess.run([LAB, *args], check=True, env=env)


def lab_down(env=None):
    try:
        subprocess.run([LAB, "down"], env=env, check=False)
    except KeyboardInterrupt:
        subprocess.run([LAB, "down"], env=env, check=False)


def ctl_env():
    return [
        "env",
        f"HOME={LAB_DIR}/ctl/home",
        f"XDG_CONFIG_HOME={LAB_DIR}/ctl/config",
        f"XDG_STATE_HOME={LAB_DIR}/ctl/state",
        f"XDG_CACHE_HOME={LAB_DIR}/ctl/cache",
        "NO_COLOR=1",
    ]


def in_ctl(argv):
    return ["ip", "netns", "exec", CTL, *ctl_env(), *argv]


def ctl_tx_bytes():
    """Bytes sent so far on the controller's link."""
    out = subprocess.run(
        ["ip", "netns", "exec", CTL, "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip())


def cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields), idle


def cpu_busy_pct(c0, c1):
    """Whole machine, all cores, between two cpu_times() samples."""
    return 100.0 * (1 - (c1[1] - c0[1]) / max(1, c1[0] - c0[0]))


def node_name(i):
    return f"imgn{i:02d}"


def node_addr(i):
    return f"10.77.0.{9 + i}"


def ssh_argv():
    """ssh from the controller namespace to a lab node, as the lab's key allows."""
    return [
        "ssh", "-i", os.path.join(LAB_DIR, "client_key"),
        "-o", f"UserKnownHostsFile={os.path.join(LAB_DIR, 'known_hosts')}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
    ]


def run_timed(argv, timeout):
    """Run argv in its own process group; (seconds, rc, stdout, stderr)."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        raise
    return time.monotonic() - t0, p.returncode, out, err


def run_streamed(argv, timeout, stdin=None):
    """Run argv in its own process group, noting when each stdout line arrived.

    Returns (seconds, rc, [(seconds since start, line)], stderr); rc is None
    when the command overran `timeout` (it is killed, with its group).
    """
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    lines, err = [], []

    def read_out():
        for line in p.stdout:
            lines.append((time.monotonic() - t0, line))

    def read_err():
        err.append(p.stderr.read())

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for r in readers:
        r.start()

    def kill():
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    rc = None
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill()
    except BaseException:
        kill()
        raise
    secs = time.monotonic() - t0
    for r in readers:
        r.join()
    return secs, rc, lines, "".join(err)


def write_random(path, mib, seed):
    """Seeded random bytes (incompressible: zstd cannot help)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(1 << 20))


def same_content(a, b):
    """Byte for byte, streaming; False also when either file is missing."""
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x = fa.read(1 << 20)
                if x != fb.read(1 << 20):
                    return False
                if not x:
                    return True
    except OSError:
        return False


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return a / b if a is not None and b else None
