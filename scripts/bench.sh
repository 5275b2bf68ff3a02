#!/usr/bin/env bash
# The benchmarks (tests/bench.rs): installs what they need on a Debian/Ubuntu
# machine when missing, runs them one at a time against real sshd nodes on
# 127.0.0.1, and writes their tables to bench/results.md.
#
#   scripts/bench.sh                # 5 interleaved rounds (3 for the slow cases)
#   BENCH_RUNS=3 scripts/bench.sh   # the same number of rounds everywhere (1 to 9)
#
# Takes about 10 minutes on 2 cores and about 6 GiB of temporary disk space
# (in the system temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v parallel-scp >/dev/null 2>&1 || need+=(pssh)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v xxhsum >/dev/null 2>&1 || need+=(xxhash)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p bench
out=bench/results.md
tmp=$(mktemp bench/.results.XXXXXX)
trap 'rm -f "$tmp"' EXIT

{
    echo "# imaging benchmarks"
    echo
    echo "Produced by \`scripts/bench.sh\` ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
    echo "Machine: $(nproc) cores, $(uname -sr), $(ssh -V 2>&1), $(rsync --version | head -1 | sed 's/  */ /g'), parallel-scp $(parallel-scp --version 2>&1), $(xxhsum --version 2>&1 | head -1 | sed 's/ by .*//')."
    echo "All nodes are sshd processes on 127.0.0.1 (the test rig), so client and node share the machine's cores."
} >"$tmp"

# Tables are the lines the tests print with the "md| " prefix; everything
# else (the harness's lines) goes to the terminal only.
cargo test --release --test bench -- --ignored --nocapture --test-threads=1 \
    | tee /dev/stderr | sed -n 's/^md| \{0,1\}//p' >>"$tmp"

mv -f "$tmp" "$out"
trap - EXIT
echo "wrote $out"
