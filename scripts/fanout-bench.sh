#!/usr/bin/env bash
# Fan-out benchmark: parallel-scp vs `imaging load --fanout star` vs
# `--fanout chain`, for N = 1 2 4 8 16 nodes on the namespace lab of
# scripts/lab.sh, every link shaped to $RATE (default 100mbit).
# Writes bench/fanout.md and bench/fanout.png and prints PASS/FAIL lines
# for the chain goals. Needs root. About 40 minutes at 100mbit.
#
#   scripts/fanout-bench.sh
#   RATE=200mbit scripts/fanout-bench.sh
#
# Knobs (see scripts/fanout_bench.py): RATE, NODES_LIST, RUNS, SLOW_RUNS,
# SIZE_MIB, SEED, EXTRA_CHUNK, OUT, LAB_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "fanout-bench: needs root (network namespaces)" >&2; exit 2; }

need=()
command -v parallel-scp >/dev/null 2>&1 || need+=(pssh)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -c "import matplotlib" 2>/dev/null; then
    echo "installing: matplotlib"
    python3 -m pip install -q matplotlib
fi

out=$(scripts/build-release.sh)
bin=${out%%$'\n'*}
echo "imaging: $bin"

trap 'scripts/lab.sh down' EXIT
trap 'exit 130' INT TERM
python3 scripts/fanout_bench.py "$bin"
