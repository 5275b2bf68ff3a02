#!/usr/bin/env bash
# A throwaway network lab of real SSH nodes in network namespaces, with
# shaped links, for trying and benchmarking `imaging load` fan-outs.
#
#   scripts/lab.sh up K RATE             build the lab: K nodes, every link RATE
#   scripts/lab.sh down                  tear it down (idempotent)
#   scripts/lab.sh run K RATE -- CMD…    up, run CMD in the controller's
#                                        namespace, always down; exits with CMD's code
#   scripts/lab.sh status                what is up
#
# RATE is a tc rate in bits: 100mbit, 1gbit, 500kbit.
#
# Topology (root only; no address outside the namespaces is touched):
#
#   imgsw      switch namespace with bridge br0
#   imgctl     controller, eth0 10.77.0.1/24  --veth-- s-ctl  on br0
#   imgnNN     node NN,     eth0 10.77.0.(9+NN)/24 --veth-- s-nNN on br0
#
# Every link is shaped with tbf at RATE in both directions: on the namespace
# side of its veth (what the namespace sends) and on the bridge side (what it
# receives). Each node namespace runs its own sshd on 10.77.0.(9+NN):22 with
# its own host key, authorizing one client key. Nodes share this machine's
# filesystem, so each node gets its own paths: its load stamps live in
# nodes/imgnNN/cache (sshd sets XDG_CACHE_HOME), its SFTP start directory is
# targets/pscp-imgnNN (so `scp file 10.77.0.11:x.img` lands there), and
# imaging targets are targets/{name}.img. targets/ is a tmpfs: on a real lab
# every node writes its own disk; here 16 "disks" would share one.
#
# The lab dir ($LAB_DIR, default ${TMPDIR:-/tmp}/imaging-lab) holds the
# client key, known_hosts, a parallel-ssh hosts file, sshd configs and logs,
# and imaging.conf for the nodes (use it with --config, or through
# `lab.sh run`, which sets IMAGING_CONFIG and a HOME/XDG inside the lab dir).
#
# Environment for `up`/`run`:
#   LAB_DIR         the lab dir (see above)
#   LAB_AGENT       an imaging executable: copied into the lab dir and named
#                   by [load] agent_path (nodes share the filesystem), so no
#                   agent is uploaded into root's home
#   LAB_RELAY_KEYS  0: leave the [load] relay_* keys out of imaging.conf (for
#                   builds of imaging without the relay chain)
#   LAB_TARGETS_SIZE  size of the targets tmpfs (default 8g)
#   LAB_SLOW        links that differ from RATE: "I:RATE[,I:RATE…]", e.g.
#                   "4:20mbit" shapes node 4's link to 20mbit both ways
set -euo pipefail

SW=imgsw
CTL=imgctl
NODE_PREFIX=imgn
NET=10.77.0
CTL_ADDR=$NET.1
SSHD=/usr/sbin/sshd
SFTP_SERVER=/usr/lib/openssh/sftp-server
# The one sshd configuration of lab nodes, shared with the Rust rig (src/lab).
SSHD_TEMPLATE=$(cd "$(dirname "$0")/.." && pwd)/assets/sshd_config
LAB_DIR=${LAB_DIR:-${TMPDIR:-/tmp}/imaging-lab}
MARKER=.imaging-lab

log() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 2; }

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

node_name() { printf '%s%02d' "$NODE_PREFIX" "$1"; }
node_addr() { echo "$NET.$((9 + $1))"; }

# Is this one of the namespace names the lab makes?
is_lab_ns() { [[ $1 == "$SW" || $1 == "$CTL" || $1 =~ ^${NODE_PREFIX}[0-9][0-9]$ ]]; }

lab_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | while read -r ns; do
        if is_lab_ns "$ns"; then echo "$ns"; fi
    done
}

# RATE (tc syntax, bits) -> bytes per second.
rate_bytes() {
    local r=${1,,}
    [[ $r =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit)$ ]] \
        || die "rate '$1': expected a number and bit, kbit, mbit or gbit (e.g. 100mbit)"
    local mult
    case ${BASH_REMATCH[3]} in
        bit) mult=1 ;; kbit) mult=1000 ;; mbit) mult=1000000 ;; gbit) mult=1000000000 ;;
    esac
    awk -v n="${BASH_REMATCH[1]}" -v m="$mult" 'BEGIN { printf "%d\n", n * m / 8 }'
}

check_tools() {
    local t
    for t in ip tc ssh ssh-keygen "$SSHD" "$SFTP_SERVER" mountpoint; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (apt-get install iproute2 openssh-server openssh-client)"
    done
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
}

lab_dir_ok() {
    case $LAB_DIR in
        /*) ;;
        *) die "LAB_DIR must be an absolute path" ;;
    esac
    [[ $LAB_DIR != *[\"\\]* ]] || die "LAB_DIR must not hold quotes or backslashes"
}

# ---------------------------------------------------------------- down

down() {
    local ns pids found=0
    for ns in $(lab_namespaces); do
        found=1
        # Every process in a lab namespace was started by the lab (sshd, its
        # sessions, agents, relays): end them by pid, then drop the namespace.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
        fi
    done
    if [ "$found" = 1 ]; then
        local i
        for i in $(seq 1 20); do
            pids=""
            for ns in $(lab_namespaces); do
                pids+=" $(ip netns pids "$ns" 2>/dev/null || true)"
            done
            [ -z "${pids// /}" ] && break
            if [ "$i" -ge 10 ]; then
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null || true
            fi
            sleep 0.1
        done
        for ns in $(lab_namespaces); do
            ip netns del "$ns" 2>/dev/null || log "cannot delete namespace $ns"
        done
    fi
    if [ -f "$LAB_DIR/$MARKER" ] && mountpoint -q "$LAB_DIR/targets"; then
        umount "$LAB_DIR/targets" 2>/dev/null || umount -l "$LAB_DIR/targets" || true
    fi
    if [ "$found" = 1 ]; then log "down: namespaces deleted, sshds ended"; fi
}

# ---------------------------------------------------------------- up

# tbf's bucket for a link of RATE, in bytes: at least one tick's worth at
# HZ=250. From 10mbit up, at least 128 KiB, so that the 64 KiB TSO/GSO
# packets the hosts' TCP sends (as a NIC with TSO takes them) pass whole: a
# smaller bucket makes tbf split each into MTU segments in software, which at
# 16 nodes x 100mbit kept this 2-core machine 95% busy and so measured the
# lab, not the tool. The rate over any longer span is RATE either way. Below
# 10mbit, 32 KiB (128 KiB would be a long burst there).
burst_for() {
    local rate_b floor=32768
    rate_b=$(rate_bytes "$1")
    if [ "$rate_b" -ge 1250000 ]; then floor=131072; fi
    echo $(( rate_b / 250 > floor ? rate_b / 250 : floor ))
}

shape() { # NS DEV RATE: tbf at RATE on DEV's egress
    local burst
    burst=$(burst_for "$3")
    ip -n "$1" link set "$2" up
    tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst "$burst" latency "$LATENCY"
}

# LAB_SLOW -> "I RATE" lines, checked against K.
slow_links() {
    local spec i rate slow=${LAB_SLOW:-}
    for spec in ${slow//,/ }; do
        [[ $spec =~ ^([0-9]+):(.+)$ ]] || die "LAB_SLOW '$spec': expected NODE:RATE, e.g. 4:20mbit"
        i=$((10#${BASH_REMATCH[1]}))
        rate=${BASH_REMATCH[2]}
        [ "$i" -ge 1 ] && [ "$i" -le "$K" ] || die "LAB_SLOW '$spec': no node $i in a lab of $K"
        rate_bytes "$rate" >/dev/null
        echo "$i $rate"
    done
}

link_rate() { # i: node i's rate (LAB_SLOW, else RATE)
    local i r
    while read -r i r; do
        if [ "$i" = "$1" ]; then echo "$r"; return; fi
    done <<<"$SLOW_LINKS"
    echo "$RATE"
}

keygen() { ssh-keygen -q -t ed25519 -N "" -C "$2" -f "$1" </dev/null; }

write_sshd_config() { # i
    local name addr dir
    name=$(node_name "$1")
    addr=$(node_addr "$1")
    dir=$LAB_DIR/nodes/$name
    # Placeholder values must not hold '|', the sed delimiter.
    grep -v '^#' "$SSHD_TEMPLATE" | sed \
        -e "s|{port}|22|" \
        -e "s|{address}|$addr|" \
        -e "s|{host_key}|$dir/host_key|" \
        -e "s|{authorized_keys}|$LAB_DIR/authorized_keys|" \
        -e "s|{sftp_server}|$SFTP_SERVER -d $LAB_DIR/targets/pscp-$name|" \
        -e "s|{set_env}| XDG_CACHE_HOME=$dir/cache|" \
        >"$dir/sshd_config"
}

write_imaging_conf() {
    local conf=$LAB_DIR/imaging.conf i
    {
        echo "# The lab's nodes (scripts/lab.sh up $K $RATE)."
        echo "[ssh]"
        echo "user = \"root\""
        echo "identity_file = \"$LAB_DIR/client_key\""
        echo "known_hosts = \"strict\""
        echo "known_hosts_file = \"$LAB_DIR/known_hosts\""
        echo "connect_timeout = 5"
        echo
        echo "[repository]"
        echo "dir = \"$LAB_DIR/images\""
        echo
        echo "[load]"
        echo "target = \"$LAB_DIR/targets/{name}.img\""
        if [ "${LAB_RELAY_KEYS:-1}" != 0 ]; then
            echo "relay_bind = \"\""
        fi
        if [ -n "${LAB_AGENT:-}" ]; then
            echo "agent_path = \"$LAB_DIR/bin/imaging\""
        fi
        echo
        echo "[nodes]"
        echo "all = \"1-$K\""
        for i in $(seq 1 "$K"); do
            echo
            echo "[[node]]"
            echo "name = \"$(node_name "$i")\""
            echo "address = \"$(node_addr "$i")\""
            echo "port = 22"
        done
    } >"$conf"
}

up() {
    K=$1
    RATE=$2
    [[ $K =~ ^[0-9]+$ ]] && [ "$K" -ge 1 ] && [ "$K" -le 99 ] || die "K must be 1 to 99, not '$K'"
    check_tools
    lab_dir_ok
    BURST=$(burst_for "$RATE")
    # queue: 25 ms.
    LATENCY=25ms
    SLOW_LINKS=$(slow_links)

    down
    # A fresh lab dir, but only ever wipe one the lab made.
    if [ -e "$LAB_DIR" ]; then
        [ -f "$LAB_DIR/$MARKER" ] || die "$LAB_DIR exists and is not a lab dir; set LAB_DIR"
        rm -rf "$LAB_DIR"
    fi
    mkdir -p "$LAB_DIR"/{nodes,targets,images,bin,ctl/home,ctl/config,ctl/state,ctl/cache}
    touch "$LAB_DIR/$MARKER"
    mount -t tmpfs -o "size=${LAB_TARGETS_SIZE:-8g},mode=0755" imaging-lab-targets "$LAB_DIR/targets"
    mkdir -p /run/sshd && chmod 755 /run/sshd
    if [ -n "${LAB_AGENT:-}" ]; then
        install -m 755 "$LAB_AGENT" "$LAB_DIR/bin/imaging"
    fi

    keygen "$LAB_DIR/client_key" lab-client
    cp "$LAB_DIR/client_key.pub" "$LAB_DIR/authorized_keys"
    : >"$LAB_DIR/known_hosts"
    : >"$LAB_DIR/hosts"

    # switch
    ip netns add "$SW"
    ip -n "$SW" link set lo up
    ip -n "$SW" link add br0 type bridge
    ip -n "$SW" link set br0 up

    # controller and nodes: one veth each, shaped at both ends
    local i ns addr sport rate
    local all=("$CTL")
    for i in $(seq 1 "$K"); do all+=("$(node_name "$i")"); done
    for ns in "${all[@]}"; do
        if [ "$ns" = "$CTL" ]; then addr=$CTL_ADDR; sport=s-ctl; rate=$RATE
        else i=$((10#${ns#"$NODE_PREFIX"})); addr=$(node_addr "$i"); sport=s-n$(printf %02d "$i"); rate=$(link_rate "$i"); fi
        ip netns add "$ns"
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
        ip -n "$ns" link set lo up
        ip -n "$SW" link add "$sport" type veth peer name eth0 netns "$ns"
        ip -n "$SW" link set "$sport" master br0
        ip -n "$ns" addr add "$addr/24" dev eth0
        shape "$ns" eth0 "$rate"
        shape "$SW" "$sport" "$rate"
    done

    # one sshd per node
    local name dir kind key
    for i in $(seq 1 "$K"); do
        name=$(node_name "$i")
        addr=$(node_addr "$i")
        dir=$LAB_DIR/nodes/$name
        mkdir -p "$dir/cache" "$LAB_DIR/targets/pscp-$name"
        keygen "$dir/host_key" "$name"
        read -r kind key _ <"$dir/host_key.pub"
        echo "$addr $kind $key" >>"$LAB_DIR/known_hosts"
        echo "$addr" >>"$LAB_DIR/hosts"
        write_sshd_config "$i"
        # Detached from this shell's session so that it outlives `up`;
        # `down` ends it through the namespace's pid list.
        setsid ip netns exec "$name" "$SSHD" -D -e -f "$dir/sshd_config" \
            </dev/null >>"$dir/sshd.log" 2>&1 &
    done
    write_imaging_conf
    {
        echo "K=$K"
        echo "RATE=$RATE"
        echo "LAB_SLOW=${LAB_SLOW:-}"
    } >"$LAB_DIR/lab.env"

    # Every node must take an SSH login from the controller namespace.
    local ok tries
    for i in $(seq 1 "$K"); do
        addr=$(node_addr "$i")
        ok=0
        for tries in $(seq 1 50); do
            if ip netns exec "$CTL" ssh -i "$LAB_DIR/client_key" \
                -o UserKnownHostsFile="$LAB_DIR/known_hosts" -o StrictHostKeyChecking=yes \
                -o BatchMode=yes -o ConnectTimeout=2 -o LogLevel=ERROR \
                "root@$addr" true </dev/null 2>/dev/null; then
                ok=1
                break
            fi
            sleep 0.2
        done
        if [ "$ok" != 1 ]; then
            log "node $(node_name "$i") ($addr) does not take an SSH login; its sshd log:"
            cat "$LAB_DIR/nodes/$(node_name "$i")/sshd.log" >&2 || true
            return 1
        fi
    done

    echo "lab up: $K nodes, every link shaped to $RATE both ways (tbf burst ${BURST}B latency $LATENCY)"
    local r
    while read -r i r; do
        if [ -n "$i" ]; then echo "  slow link   $(node_name "$i") at $r both ways"; fi
    done <<<"$SLOW_LINKS"
    echo "  switch      $SW (bridge br0)"
    echo "  controller  $CTL  $CTL_ADDR"
    echo "  nodes       $(node_name 1)..$(node_name "$K")  $(node_addr 1)..$(node_addr "$K")  sshd :22, ssh root@ from $CTL: OK"
    echo "  lab dir     $LAB_DIR"
    echo "    imaging.conf   nodes 1-$K, targets targets/{name}.img (tmpfs), images images/"
    echo "    client_key, known_hosts, hosts (parallel-ssh hosts file)"
    echo "  try: ip netns exec $CTL ssh -i $LAB_DIR/client_key -o UserKnownHostsFile=$LAB_DIR/known_hosts root@$(node_addr 1) true"
}

status() {
    local ns
    for ns in $(lab_namespaces); do
        echo "$ns: $(ip netns pids "$ns" | wc -l) processes"
    done
    [ -f "$LAB_DIR/lab.env" ] && cat "$LAB_DIR/lab.env"
    return 0
}

# ---------------------------------------------------------------- main

cmd=${1:-}
case $cmd in
    up)
        [ $# -eq 3 ] || usage
        trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed, tearing down"; down; fi' EXIT
        trap 'exit 130' INT TERM
        up "$2" "$3"
        ;;
    down)
        [ $# -eq 1 ] || usage
        check_tools
        down
        ;;
    status)
        status
        ;;
    run)
        [ $# -ge 5 ] && [ "$4" = "--" ] || usage
        K=$2
        RATE=$3
        shift 4
        trap 'down' EXIT
        trap 'exit 130' INT TERM
        up "$K" "$RATE"
        set +e
        ip netns exec "$CTL" env \
            LAB_DIR="$LAB_DIR" \
            IMAGING_CONFIG="$LAB_DIR/imaging.conf" \
            HOME="$LAB_DIR/ctl/home" \
            XDG_CONFIG_HOME="$LAB_DIR/ctl/config" \
            XDG_STATE_HOME="$LAB_DIR/ctl/state" \
            XDG_CACHE_HOME="$LAB_DIR/ctl/cache" \
            "$@"
        rc=$?
        set -e
        exit "$rc"
        ;;
    *)
        usage
        ;;
esac
