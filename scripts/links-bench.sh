#!/usr/bin/env bash
# Link benchmark: how well `imaging load` uses shaped links, each case against
# a reference tool in the same run, on the namespace lab of scripts/lab.sh
# (every link $RATE, default 100mbit): a reload after scattered small changes
# vs rsync, chain scaling (N = 1 4 16, chunk sizes), a chain with one slow
# node, an up-to-date reload vs rsync, one node vs `ssh cat` and the line rate.
# Writes bench/links.md and prints PASS/FAIL per goal. Needs root. About 15
# minutes at 100mbit with the defaults.
#
#   scripts/links-bench.sh
#   CASES=reload RUNS=1 SIZE_MIB=16 scripts/links-bench.sh    # a quick smoke run
#
# Knobs (see scripts/links_bench.py): CASES, RATE, RUNS, SIZE_MIB, CHAIN_MIB,
# SLOW_MIB, CHAIN_NODES, CHAIN_CHUNKS, RELOAD_CHUNK, CHANGES, SLOW_K,
# SLOW_NODE, SLOW_RATE, SEED, OUT, LAB_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "links-bench: needs root (network namespaces)" >&2; exit 2; }

need=()
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

out=$(scripts/build-release.sh)
bin=${out%%$'\n'*}
echo "imaging: $bin"

trap 'scripts/lab.sh down' EXIT
trap 'exit 130' INT TERM
python3 scripts/links_bench.py "$bin"
