#!/usr/bin/env python3
"""Fan-out benchmark: parallel-scp vs `imaging load --fanout star|chain`.

Called by scripts/fanout-bench.sh (which installs what is missing and builds
the release binary): `fanout_bench.py IMAGING_BINARY`.

Brings up the network lab of scripts/lab.sh with as many nodes as the largest
N (every link shaped to RATE both ways), generates a seeded random image, and
for each N runs every method RUNS times, interleaved (rep 1: N=1 pscp, star,
chain, …, N=16 …; rep 2: …), all from the controller namespace. Every target
and every load stamp is deleted before each run, so each run transfers the
whole image; every target is compared with the image after each run (not
timed). Medians go into bench/fanout.md and bench/fanout.png.

Environment:
  RATE        link rate, tc syntax (default 100mbit)
  NODES_LIST  the N values (default "1 2 4 8 16")
  RUNS        runs per method and N (default 3)
  SLOW_RUNS   runs for pscp and star at the largest N, the longest runs
              (default 2; they take N times the single-node time)
  SIZE_MIB    image size (default 128)
  SEED        image seed (default 1)
  EXTRA_CHUNK chunk size for an extra chain variant through a config layer
              with [load] chunk_size (default 1048576; empty: none)
  OUT         output dir (default bench/ in the repo)

The lab is torn down on exit, failure and Ctrl-C.
"""

import json
import os
import random
import subprocess
import sys
import time

from labbench import (
    LAB_DIR,
    REPO,
    Interrupted,
    catch_signals,
    cpu_busy_pct,
    cpu_times,
    ctl_tx_bytes,
    fmt,
    in_ctl,
    lab,
    lab_down,
    log,
    med,
    node_name,
    rate_bytes,
    run_timed,
)

RATE = os.environ.get("RATE", "100mbit")
NS = [int(x) for x in os.environ.get("NODES_LIST", "1 2 4 8 16").split()]
RUNS = int(os.environ.get("RUNS", "3"))
SLOW_RUNS = int(os.environ.get("SLOW_RUNS", "2"))
SIZE_MIB = int(os.environ.get("SIZE_MIB", "128"))
SEED = int(os.environ.get("SEED", "1"))
EXTRA_CHUNK = os.environ.get("EXTRA_CHUNK", "1048576").strip()
OUT = os.environ.get("OUT") or os.path.join(REPO, "bench")
IMAGE_NAME = "bench.img"


def clean_targets():
    """Every target and every load stamp goes, so the next run transfers all."""
    tdir = os.path.join(LAB_DIR, "targets")
    for entry in os.listdir(tdir):
        p = os.path.join(tdir, entry)
        if os.path.isdir(p):
            for f in os.listdir(p):
                os.remove(os.path.join(p, f))
        else:
            os.remove(p)
    ndir = os.path.join(LAB_DIR, "nodes")
    for node in os.listdir(ndir):
        stamps = os.path.join(ndir, node, "cache", "imaging", "stamps")
        if os.path.isdir(stamps):
            for f in os.listdir(stamps):
                os.remove(os.path.join(stamps, f))


def target_path(method, i):
    if method == "pscp":
        return os.path.join(LAB_DIR, "targets", f"pscp-{node_name(i)}", "pscp.img")
    return os.path.join(LAB_DIR, "targets", f"{node_name(i)}.img")


def verify(method, n, image_bytes):
    bad = []
    for i in range(1, n + 1):
        p = target_path(method, i)
        try:
            with open(p, "rb") as f:
                if f.read() != image_bytes:
                    bad.append(f"{node_name(i)}: content differs")
        except OSError as e:
            bad.append(f"{node_name(i)}: {e}")
    return bad


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: fanout_bench.py IMAGING_BINARY")
    binary = os.path.abspath(sys.argv[1])
    rate_b = rate_bytes(RATE)
    size = SIZE_MIB << 20
    kmax = max(NS)
    one_copy_s = size / rate_b

    help_text = subprocess.run([binary, "load", "--help"], capture_output=True,
                               text=True, check=True).stdout
    has_fanout = "--fanout" in help_text
    methods = ["pscp", "star"]
    if has_fanout:
        methods.append("chain")
        if EXTRA_CHUNK:
            methods.append("chain-extra")
    else:
        log("this imaging has no --fanout: `star` runs plain `imaging load`, chain is skipped")

    catch_signals()
    env = dict(os.environ, LAB_DIR=LAB_DIR, LAB_AGENT=binary,
               LAB_RELAY_KEYS="1" if has_fanout else "0")
    results = {m: {n: [] for n in NS} for m in methods}
    samples = []
    try:
        lab("up", str(kmax), RATE, env=env)
        conf = os.path.join(LAB_DIR, "imaging.conf")
        conf_extra = os.path.join(LAB_DIR, "imaging-chunk.conf")
        if "chain-extra" in methods:
            # One full layer: the lab's config with [load] chunk_size set.
            with open(conf) as f:
                text = f.read()
            text = text.replace("[load]\n", f"[load]\nchunk_size = {EXTRA_CHUNK}\n", 1)
            with open(conf_extra, "w") as f:
                f.write(text)

        # The image: seeded random bytes (incompressible: zstd cannot help).
        image = os.path.join(LAB_DIR, "images", IMAGE_NAME)
        rng = random.Random(SEED)
        with open(image, "wb") as f:
            for _ in range(SIZE_MIB):
                f.write(rng.randbytes(1 << 20))
        with open(image, "rb") as f:
            image_bytes = f.read()
        log(f"image {IMAGE_NAME}: {SIZE_MIB} MiB random (seed {SEED}); "
            f"one copy over {RATE} = {one_copy_s:.1f} s at line rate")

        key = os.path.join(LAB_DIR, "client_key")
        kh = os.path.join(LAB_DIR, "known_hosts")
        hostfiles = {}
        for n in NS:
            hf = os.path.join(LAB_DIR, f"hosts-{n}")
            with open(hf, "w") as f:
                for i in range(1, n + 1):
                    f.write(f"10.77.0.{9 + i}\n")
            hostfiles[n] = hf

        def command(method, n):
            if method == "pscp":
                # Relative remote path: each node's SFTP start directory is
                # its own targets/pscp-imgnNN (the nodes share one filesystem).
                return [
                    "parallel-scp", "-h", hostfiles[n], "-l", "root", "-p", "32",
                    "-x", f"-i {key} -o UserKnownHostsFile={kh} "
                          "-o StrictHostKeyChecking=yes -o BatchMode=yes",
                    "-t", "0", image, "pscp.img",
                ]
            cfg = conf_extra if method == "chain-extra" else conf
            argv = [binary, "--config", cfg, "--json", "load"]
            if has_fanout:
                argv += ["--fanout", "chain" if method.startswith("chain") else "star"]
            return argv + ["-i", IMAGE_NAME, f"1-{n}"]

        def one_run(method, n, timed=True):
            clean_targets()
            limit = 120 + 4 * one_copy_s * (n if method in ("pscp", "star") else 1 + n / 4)
            tx0 = ctl_tx_bytes()
            c0 = cpu_times()
            secs, rc, out, err = run_timed(in_ctl(command(method, n)), limit)
            c1 = cpu_times()
            tx = ctl_tx_bytes() - tx0
            busy = cpu_busy_pct(c0, c1)
            problems = []
            if rc != 0:
                problems.append(f"exit {rc}")
            if method != "pscp":
                summary = None
                for line in out.splitlines():
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev.get("event") == "summary":
                        summary = ev
                if not summary or not summary.get("ok"):
                    problems.append("summary not ok")
                else:
                    states = {nd["state"] for nd in summary["nodes"]}
                    if states != {"done"} or len(summary["nodes"]) != n:
                        problems.append(f"node states {sorted(states)}")
            problems += verify(method, n, image_bytes)
            status = "ok" if not problems else "FAILED: " + "; ".join(problems[:4])
            log(f"{method:11s} N={n:2d} {secs:7.2f} s  ctl sent {tx / size:5.2f}x image  "
                f"cpu {busy:3.0f}%  {status}")
            if problems:
                tail = (err.strip().splitlines() or [""])[-3:]
                for line in tail:
                    log(f"    {line}")
            if timed:
                samples.append({"method": method, "n": n, "s": round(secs, 3),
                                "ctl_tx_x": round(tx / size, 3), "cpu_pct": round(busy),
                                "ok": not problems})
                if not problems:
                    results[method][n].append(secs)

        # Warm-up, not timed: manifest build and cache, page cache, sshds.
        for m in methods:
            one_run(m, 1, timed=False)

        started = time.monotonic()
        for rep in range(1, RUNS + 1):
            log(f"--- rep {rep}/{RUNS}")
            for n in NS:
                for m in methods:
                    if n == kmax and m in ("pscp", "star") and rep > SLOW_RUNS:
                        continue
                    one_run(m, n)
        log(f"timed runs took {(time.monotonic() - started) / 60:.1f} min")
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({str(e) or 'Ctrl-C'}): tearing down")
        raise SystemExit(130)
    finally:
        lab_down(env)

    write_report(methods, results, samples, has_fanout)


def write_report(methods, results, samples, has_fanout):
    os.makedirs(OUT, exist_ok=True)
    m = {meth: {n: med(results[meth][n]) for n in NS} for meth in methods}
    chain = m.get("chain", {n: None for n in NS})
    n1, nmax = min(NS), max(NS)
    extra = "chain-extra" in methods
    extra_label = f"chain, {int(EXTRA_CHUNK) >> 10} KiB chunks" if extra else ""

    checks = []

    def check(label, value, limit):
        ok = value is not None and value <= limit
        line = (f"{'PASS' if ok else 'FAIL'}: {label} = {fmt(value, 2)} "
                f"(goal <= {limit})")
        checks.append(line)

    def ratio(a, b):
        return a / b if a is not None and b else None

    check(f"chain@N={nmax} / chain@N={n1}", ratio(chain[nmax], chain[n1]), 1.2)
    check(f"chain@N={nmax} / pscp@N={nmax}", ratio(chain[nmax], m["pscp"][nmax]), 0.15)
    extra_checks = []
    if extra:
        ce = m["chain-extra"]
        for lbl, v, lim in [
            (f"chain@N={nmax} / chain@N={n1}", ratio(ce[nmax], ce[n1]), 1.2),
            (f"chain@N={nmax} / pscp@N={nmax}", ratio(ce[nmax], m["pscp"][nmax]), 0.15),
        ]:
            ok = v is not None and v <= lim
            extra_checks.append(f"{'PASS' if ok else 'FAIL'}: [{extra_label}] {lbl} = "
                                f"{fmt(v, 2)} (goal <= {lim})")

    head = "| N | pscp s | star s | chain s | chain/chain@N=1 | chain/pscp |"
    sep = "|---|---|---|---|---|---|"
    if extra:
        head += f" {extra_label} s | its ratio to its N=1 |"
        sep += "---|---|"
    rows = [head, sep]
    for n in NS:
        row = (f"| {n} | {fmt(m['pscp'][n])} | {fmt(m['star'][n])} | {fmt(chain[n])} | "
               f"{fmt(ratio(chain[n], chain[n1]), 2)} | {fmt(ratio(chain[n], m['pscp'][n]), 2)} |")
        if extra:
            ce = m["chain-extra"]
            row += f" {fmt(ce[n])} | {fmt(ratio(ce[n], ce[n1]), 2)} |"
        rows.append(row)

    counts = {meth: {n: len(results[meth][n]) for n in NS} for meth in methods}
    raw = ["| method | N | s | controller sent (× image) | machine CPU busy | ok |",
           "|---|---|---|---|---|---|"]
    for s in samples:
        raw.append(f"| {s['method']} | {s['n']} | {s['s']:.2f} | {s['ctl_tx_x']:.2f} | "
                   f"{s['cpu_pct']}% | {'yes' if s['ok'] else 'NO'} |")

    one_copy = (SIZE_MIB << 20) / rate_bytes(RATE)
    md = [
        "# Fan-out benchmark",
        "",
        f"{SIZE_MIB} MiB random image (seed {SEED}), every link {RATE} both ways "
        f"(one copy at line rate: {one_copy:.1f} s), nodes in network namespaces "
        "on one 2-core machine (`scripts/lab.sh`). Medians of "
        f"{RUNS} interleaved runs (pscp and star at N={nmax}: {SLOW_RUNS}), "
        "seconds, wall clock of the whole command from the controller namespace, "
        "SSH logins included. Every target and load stamp deleted before each run; "
        "every target compared with the image after it.",
        "",
        "Produced by `scripts/fanout-bench.sh` (this table, `bench/fanout.png`).",
        "",
        *rows,
        "",
        "```",
        *checks,
        *extra_checks,
        "```",
        "",
        "- pscp: one `parallel-scp -h hosts -l root -p 32 -t 0 IMAGE pscp.img` "
        "per run (one scp per node, all at once). The nodes share this machine's "
        "filesystem, so each node's sshd starts SFTP in its own directory "
        "(`sftp-server -d targets/pscp-imgnNN`): the relative remote path gives "
        "every node its own file with a single invocation.",
        "- star: `imaging load --fanout star -i bench.img 1-N` (one SSH stream per node)"
        if has_fanout else
        "- star: `imaging load -i bench.img 1-N` (this build has no `--fanout`; "
        "it streams to every node)",
        "- chain: `imaging load --fanout chain -i bench.img 1-N` (the controller "
        "feeds node 1, each node forwards to the next over TCP)"
        if has_fanout else "- chain: missing (this build has no `--fanout chain`)",
    ]
    if extra:
        md.append(f"- {extra_label}: the same with a config layer setting "
                  f"`[load] chunk_size = {EXTRA_CHUNK}` (default 4 MiB)")
    md += [
        "",
        "Runs kept per cell: " + "; ".join(
            f"{meth} " + " ".join(f"{n}:{counts[meth][n]}" for n in NS) for meth in methods),
        "",
        "## Every run",
        "",
        "In run order. *Controller sent*: bytes leaving the controller's link "
        "during the run over the image size (N copies for a star, about one "
        "for a chain). *Machine CPU busy*: both cores, whole machine (the lab's "
        "sshds and agents, and anything else running on it).",
        "",
        *raw,
        "",
    ]
    with open(os.path.join(OUT, "fanout.md"), "w") as f:
        f.write("\n".join(md))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    styles = {
        "pscp": ("parallel-scp", "o-", "tab:red"),
        "star": ("imaging --fanout star" if has_fanout else "imaging load (star)", "s-", "tab:orange"),
        "chain": ("imaging --fanout chain", "^-", "tab:blue"),
        "chain-extra": (f"imaging --fanout chain, {int(EXTRA_CHUNK or 0) >> 10} KiB chunks",
                        "v--", "tab:cyan"),
    }
    for meth in methods:
        xs = [n for n in NS if m[meth][n] is not None]
        ys = [m[meth][n] for n in xs]
        label, style, color = styles[meth]
        ax.plot(xs, ys, style, color=color, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(NS)
    ax.set_xticklabels([str(n) for n in NS])
    ax.set_xlabel("nodes (N)")
    ax.set_ylabel("time to load all N nodes (s, median)")
    ax.set_title(f"{SIZE_MIB} MiB image onto N nodes, every link {RATE}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fanout.png"))

    print()
    print("\n".join(rows))
    print()
    for line in checks + extra_checks:
        print(line)
    print(f"\nwrote {os.path.relpath(os.path.join(OUT, 'fanout.md'), REPO)} and "
          f"{os.path.relpath(os.path.join(OUT, 'fanout.png'), REPO)}")


if __name__ == "__main__":
    main()
