#!/bin/bash
# =================================================================================================
# cluster.sh -- a throw-away Corosync 3 + Pacemaker 2.1 cluster on ONE Linux host, each node in
# network, mount, pid and UTS namespaces of its own: the project's cluster test tier (issue 11).
#
#   cluster.sh up     DIR            create the network, start node1..nodeN and the power switch
#   cluster.sh down   DIR            kill everything and delete the namespaces (DIR is kept: logs)
#   cluster.sh exec   DIR NODE CMD.. run CMD inside NODE's namespaces
#   cluster.sh kill   DIR NODE       "pull the plug": cut NODE's link, SIGKILL all its processes
#   cluster.sh cut    DIR NODE       pull NODE's cable only: its processes run on, cut off from
#                                    the others (fencing kills it and starts it again)
#   cluster.sh start  DIR NODE       start NODE again (after kill or fencing)
#   cluster.sh status DIR            host-side view: which nodes run, which links are up
#   cluster.sh netns  DIR NODE       print the path of NODE's network namespace (/run/netns/..)
#
#   NODE is node1..nodeN (or 1..N). Needs root, iproute2, util-linux (nsenter, unshare) and the
#   packages corosync, pacemaker and pacemaker-cli-utils (bash ci/setup.sh installs them). No
#   systemd: each node runs `corosync -f` and `pacemakerd` under a small init of its own.
#
# What `up` gives: all nodes online with quorum about 5 s later; fencing configured and enabled
# (stonith resource "fence-testcluster", agent ha/testcluster/fence_testcluster); the OCF agent
# ha/ocf/vhost-mirror installed on every node as ocf:vhost-mirror:disk, ha/ocf/vm as
# ocf:vhost-mirror:vm. Nothing else: the
# caller adds its resources (cibadmin, crm_attribute through `exec`).
#
# Knobs (environment, read by `up`):
#   TC_NODES=3           number of nodes
#   TC_SUBNET=10.77.0    node I has address $TC_SUBNET.I/24 (each cluster has its own network,
#                        so two clusters may use the same subnet)
#   TC_TOKEN=500         corosync totem.token (ms): a dead node is noticed after the token
#                        timeout plus the consensus timeout (1.2 x token): 1.1 s at 500 ms
#   TC_TOKEN_COEFF=0     corosync totem.token_coefficient (ms); corosync's default, 650, adds
#                        650 ms per node above two to the token timeout
#   TC_TRANSITION_DELAY=150ms  Pacemaker's transition-delay, seeded into the initial CIB: the
#                        DC asks for the scheduler this long after the last of a burst of
#                        changes. At 0 (the default) it asks at the first, while its own updates
#                        about a lost node are still pending, and Pacemaker 2.1 then sleeps 1 s
#                        ("Re-asking for the CIB") before it schedules the fencing
#   TC_DC_DEADTIME=2s    Pacemaker's dc-deadtime, seeded into the initial CIB (the default, 20 s,
#                        is how long a starting cluster waits before it elects a DC)
#   TC_FENCE_REBOOT=restart|off   what the power switch does for "reboot": kill the node and
#                        start it again (default), or only kill it
#   TC_OWNER_PID=PID     the power switch takes the whole cluster down when process PID exits
#                        (a test that is killed before it can clean up)
#
# -------------------------------------------------------------------------------------------------
# Layout. <P> is a prefix derived from DIR ("tc" + 6 hex digits of its hash), so clusters in two
# DIRs do not collide. Nothing is created in the host's own network namespace.
#
#   network  netns <P>-nI holds node I's eth0 ($TC_SUBNET.I/24); its veth peer pI sits in netns
#            <P>-br on bridge br0. `kill` sets pI down: the node's cable is pulled.
#   node     `nsenter --net=<P>-nI unshare --mount --pid --uts --fork --mount-proc cluster.sh
#            _node_init DIR I`. The forked child is PID 1 of the node's pid namespace: it sets up
#            the mounts below, starts corosync and pacemakerd, and reaps orphans. SIGKILL to
#            that PID 1 makes the kernel kill every process of the node; with the last process
#            the node's mount namespace (and every mount below) goes too.
#   mounts   (a private mount namespace: nothing propagates to the host)
#            /run, /dev/shm         private tmpfs. /dev/shm MUST be private: libqb names its
#                                   IPC ring buffers by pid, and pids restart at 1 in each node
#            /etc/corosync          DIR/nodeI/etc-corosync (corosync.conf, authkey)
#            /var/lib/corosync      DIR/nodeI/var-lib-corosync
#            /var/lib/pacemaker     DIR/nodeI/var-lib-pacemaker (the CIB)
#            /var/log/{corosync,pacemaker}  DIR/nodeI/log
#            /usr/sbin              overlay DIR/agents over the host's /usr/sbin (the fence agent;
#                                   pacemaker-fenced only looks in /usr/sbin)
#            /usr/lib/ocf/resource.d  overlay DIR/ocf over the host's (ocf:vhost-mirror:disk)
#            /run/testcluster       DIR/ctl: the power switch's FIFO, replies, the node list
#   DIR/nodeI/run  a volatile directory for the node's run-time files that the host should see
#            too (e.g. vhost-user sockets): emptied whenever the node starts, like /run at a
#            boot, but not mounted anywhere (host and node see it at the same path).
#   libqb's IPC sockets are abstract unix sockets, scoped by network namespace: the private
#   netns separates them. Path-based unix sockets (vhost-user, control sockets under /tmp) are
#   not: the host reaches them at the same path.
#
# The power switch: fence_testcluster (in a node) writes "ID ACTION NODE" into
# DIR/ctl/fence.fifo; the switch (`_switch`, a host-side daemon started by `up`) performs
# kill/start (after DIR/ctl/fence.delay seconds, if that file exists) and writes the exit code
# to DIR/ctl/reply.ID. Every request and every kill/start
# is logged with its epoch time in DIR/switch.log, so a test can line up its own clock with it.
# =================================================================================================
set -euo pipefail

SELF=$(readlink -f "$0")
HERE=$(dirname "$SELF")
TC_NODES=${TC_NODES:-3}
TC_SUBNET=${TC_SUBNET:-10.77.0}
TC_TOKEN=${TC_TOKEN:-500}
TC_TOKEN_COEFF=${TC_TOKEN_COEFF:-0}
TC_DC_DEADTIME=${TC_DC_DEADTIME:-2s}
TC_TRANSITION_DELAY=${TC_TRANSITION_DELAY:-150ms}
TC_FENCE_REBOOT=${TC_FENCE_REBOOT:-restart}
TC_OWNER_PID=${TC_OWNER_PID:-}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}
log() { echo "[$(date +%T.%3N)] $*" >&2; }
# The host-side journal: epoch seconds, one event a line.
journal() { echo "$(date +%s.%N) $2" >>"$1/switch.log"; }

# ---- names ---------------------------------------------------------------------------------------
prefix() { echo "tc$(printf %s "$1" | md5sum | cut -c1-6)"; }
ns_br() { echo "$(prefix "$1")-br"; }
ns_node() { echo "$(prefix "$1")-n$2"; }
node_index() {
    local n=${1#node}
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= $(node_count "$DIR"))) || die "no node '$1'"
    echo "$n"
}
node_count() { cat "$1/ctl/count" 2>/dev/null || echo "$TC_NODES"; }

# The command line of process $1 (empty if it is gone), NULs as spaces.
cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# Host pid of the unshare process holding node I, if it runs (checked against its command
# line, so a reused pid is never taken for it).
holder_pid() {
    local f=$1/node$2/holder.pid p
    [[ -f $f ]] || return 0
    p=$(<"$f")
    if [[ $(cmdline_of "$p") == *"_node_init $1 $2 "* ]]; then echo "$p"; fi
}
# Host pid of node I's PID 1 (the child unshare forked), if it runs.
init_pid() {
    local h c
    h=$(holder_pid "$1" "$2")
    [[ -n $h ]] || return 0
    c=$(cat "/proc/$h/task/"*/children 2>/dev/null | awk '{print $1; exit}')
    echo "${c:-}"
}

# ---- preparation (host side, once per `up`) ------------------------------------------------------
corosync_conf() {
    local i
    cat <<EOF
# generated by cluster.sh
totem {
    version: 2
    cluster_name: testcluster
    transport: knet
    crypto_cipher: aes256
    crypto_hash: sha256
    token: $TC_TOKEN
    token_coefficient: $TC_TOKEN_COEFF
    interface {
        linknumber: 0
        knet_transport: udp
    }
}
quorum {
    provider: corosync_votequorum
}
logging {
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: hires
}
nodelist {
EOF
    for ((i = 1; i <= TC_NODES; i++)); do
        printf '    node {\n        nodeid: %d\n        name: node%d\n        ring0_addr: %s.%d\n    }\n' \
            "$i" "$i" "$TC_SUBNET" "$i"
    done
    echo "}"
}

# The CIB every node starts from: cluster options (they must be there before the first
# election to shorten it) and the fence device. Written offline (CIB_file).
initial_cib() {
    local cib=$1 hosts
    hosts=$(seq -f 'node%g' -s ' ' 1 "$TC_NODES")
    cibadmin --empty >"$cib"
    CIB_file=$cib crm_attribute -t crm_config -n dc-deadtime -v "$TC_DC_DEADTIME" >/dev/null
    CIB_file=$cib crm_attribute -t crm_config -n transition-delay -v "$TC_TRANSITION_DELAY" >/dev/null
    CIB_file=$cib crm_attribute -t crm_config -n stonith-enabled -v true >/dev/null
    CIB_file=$cib cibadmin --create -o resources --xml-text "
<primitive id=\"fence-testcluster\" class=\"stonith\" type=\"fence_testcluster\">
  <instance_attributes id=\"fence-testcluster-ia\">
    <nvpair id=\"fence-testcluster-hosts\" name=\"pcmk_host_list\" value=\"$hosts\"/>
    <nvpair id=\"fence-testcluster-check\" name=\"pcmk_host_check\" value=\"static-list\"/>
  </instance_attributes>
  <operations>
    <op id=\"fence-testcluster-monitor\" name=\"monitor\" interval=\"60s\"/>
  </operations>
</primitive>"
}

prepare_dir() {
    local dir=$1 i nd
    mkdir -p "$dir/agents" "$dir/ocf/vhost-mirror" "$dir/ctl"
    echo "$TC_NODES" >"$dir/ctl/count"
    seq -f 'node%g' 1 "$TC_NODES" >"$dir/ctl/nodes"
    # One key for the whole cluster; corosync wants it owned by root, mode 0400.
    [[ -f $dir/authkey ]] || corosync-keygen -k "$dir/authkey" >/dev/null
    chmod 0400 "$dir/authkey"
    corosync_conf >"$dir/corosync.conf"
    initial_cib "$dir/cib.xml"
    install -m 0755 "$HERE/fence_testcluster" "$dir/agents/fence_testcluster"
    install -m 0755 "$HERE/../ocf/vhost-mirror" "$dir/ocf/vhost-mirror/disk"
    install -m 0755 "$HERE/../ocf/vm" "$dir/ocf/vhost-mirror/vm"
    for ((i = 1; i <= TC_NODES; i++)); do
        nd=$dir/node$i
        mkdir -p "$nd/etc-corosync" "$nd/var-lib-corosync" "$nd/log"
        install -m 0400 "$dir/authkey" "$nd/etc-corosync/authkey"
        install -m 0644 "$dir/corosync.conf" "$nd/etc-corosync/corosync.conf"
        # Pacemaker's state directories, owned as the package ships them.
        install -d -o hacluster -g haclient -m 0750 "$nd/var-lib-pacemaker" \
            "$nd/var-lib-pacemaker/cib" "$nd/var-lib-pacemaker/pengine" \
            "$nd/var-lib-pacemaker/blackbox" "$nd/var-lib-pacemaker/cores"
        install -o hacluster -g haclient -m 0600 "$dir/cib.xml" "$nd/var-lib-pacemaker/cib/cib.xml"
        # The daemons write pacemaker.log as hacluster.
        chown hacluster:haclient "$nd/log"
        chmod 0770 "$nd/log"
    done
}

net_up() {
    local dir=$1 br nn i
    br=$(ns_br "$dir")
    ip netns add "$br"
    ip -n "$br" link set lo up
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 up
    for ((i = 1; i <= TC_NODES; i++)); do
        nn=$(ns_node "$dir" "$i")
        ip netns add "$nn"
        ip -n "$nn" link set lo up
        # The veth pair is created inside the two namespaces, never in the host's.
        ip -n "$br" link add "p$i" type veth peer name eth0 netns "$nn"
        ip -n "$br" link set "p$i" master br0 up
        ip -n "$nn" addr add "$TC_SUBNET.$i/24" dev eth0
        ip -n "$nn" link set eth0 up
    done
}

# ---- one node ------------------------------------------------------------------------------------
start_node() {
    local dir=$1 i=$2 nn
    [[ -z $(holder_pid "$dir" "$i") ]] || die "node$i is already running"
    nn=$(ns_node "$dir" "$i")
    [[ -e /run/netns/$nn ]] || die "netns $nn missing (run 'up' first)"
    ip -n "$(ns_br "$dir")" link set "p$i" up # plug the cable back in
    # The node's volatile directory, emptied at every start like /run at a boot.
    rm -rf "$dir/node$i/run"
    mkdir -m 0755 "$dir/node$i/run"
    # setsid: a session of its own, away from the caller's terminal and signals. nsenter
    # execs unshare, so $! is the holder. (The empty last argument ends its command line with
    # a space, which holder_pid matches: node1 is not node10.)
    setsid nsenter --net="/run/netns/$nn" -- \
        unshare --mount --pid --uts --fork --mount-proc --propagation private -- \
        "$SELF" _node_init "$dir" "$i" "" >>"$dir/node$i/init.log" 2>&1 </dev/null &
    echo $! >"$dir/node$i/holder.pid"
    journal "$dir" "start node$i holder=$!"
}

kill_node() {
    local dir=$1 i=$2 h p
    journal "$dir" "kill node$i"
    # The cable first, so that nothing the node does while dying reaches the others.
    ip -n "$(ns_br "$dir")" link set "p$i" down 2>/dev/null || true
    h=$(holder_pid "$dir" "$i")
    p=$(init_pid "$dir" "$i")
    # SIGKILL to the node's PID 1: the kernel kills every other process of its pid namespace.
    if [[ -n $p ]]; then kill -KILL "$p" 2>/dev/null || true; fi
    if [[ -n $h ]]; then kill -KILL "$h" 2>/dev/null || true; fi
    # Wait until the holder is gone (a holder nobody reaped yet stays a zombie: gone too).
    local t
    for ((t = 0; t < 100; t++)); do
        [[ -z $h || ! -d /proc/$h ]] && break
        [[ $(awk '{print $3}' "/proc/$h/stat" 2>/dev/null) == Z ]] && break
        sleep 0.05
    done
    rm -f "$dir/node$i/holder.pid"
}

cut_node() {
    journal "$1" "cut node$2"
    ip -n "$(ns_br "$1")" link set "p$2" down
}

# PID 1 of a node (runs inside its namespaces).
node_init() {
    local dir=$1 i=$2 nd=$1/node$2
    hostname "node$i"
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    mkdir -p /run/lock /run/resource-agents /run/testcluster
    install -d -o hacluster -g haclient -m 0750 /run/crm
    mount --bind "$nd/etc-corosync" /etc/corosync
    mount --bind "$nd/var-lib-corosync" /var/lib/corosync
    mount --bind "$nd/var-lib-pacemaker" /var/lib/pacemaker
    mount --bind "$nd/log" /var/log/pacemaker
    mount --bind "$nd/log" /var/log/corosync
    mount --bind "$dir/ctl" /run/testcluster
    mount -t overlay overlay -o "lowerdir=$dir/agents:/usr/sbin" /usr/sbin
    mount -t overlay overlay -o "lowerdir=$dir/ocf:/usr/lib/ocf/resource.d" /usr/lib/ocf/resource.d

    echo "node$i: init pid $$, starting corosync"
    /usr/sbin/corosync -f &
    local t
    for ((t = 0; t < 100; t++)); do
        corosync-cmapctl -g totem.cluster_name >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "node$i: starting pacemakerd"
    # Without systemd nobody reads /etc/default/pacemaker: its settings go in the environment.
    PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none PCMK_logpriority=info \
        /usr/sbin/pacemakerd &
    # As PID 1, reap every orphan: bash reaps any child while it waits.
    trap 'exit 0' TERM
    while :; do
        sleep 3600 &
        wait $! || true
    done
}

# ---- the power switch (host side) ----------------------------------------------------------------
owner_alive() {
    [[ -z $TC_OWNER_PID ]] && return 0
    [[ $(awk '{print $22}' "/proc/$TC_OWNER_PID/stat" 2>/dev/null) == "$2" ]]
}

switch_daemon() {
    local dir=$1 fifo=$1/ctl/fence.fifo id action target rc i owner_start=
    [[ -p $fifo ]] || mkfifo -m 0600 "$fifo"
    exec 3<>"$fifo" # opened read-write: no EOF while agents come and go
    if [[ -n $TC_OWNER_PID ]]; then
        owner_start=$(awk '{print $22}' "/proc/$TC_OWNER_PID/stat" 2>/dev/null) || true
    fi
    journal "$dir" "switch ready pid=$$ owner=${TC_OWNER_PID:-none}"
    while :; do
        if ! read -r -t 1 id action target <&3; then
            if ! owner_alive "$dir" "$owner_start"; then
                journal "$dir" "owner $TC_OWNER_PID gone: taking the cluster down"
                setsid "$SELF" down "$dir" </dev/null >>"$dir/switch.log" 2>&1 &
                exit 0
            fi
            continue
        fi
        journal "$dir" "request $id $action $target"
        rc=0
        i=${target#node}
        if [[ $action != ping ]] && ! [[ $i =~ ^[0-9]+$ && $i -ge 1 && $i -le $(node_count "$dir") ]]; then
            action=invalid
        fi
        # A slow power switch (an IPMI power cycle can take many seconds): DIR/ctl/fence.delay
        # holds the seconds to wait before an off or a reboot (a test writes it).
        case $action in
        off | reboot)
            delay=$(cat "$dir/ctl/fence.delay" 2>/dev/null || true)
            if [[ $delay =~ ^[0-9]+$ ]] && ((delay > 0)); then
                journal "$dir" "delay $id ${delay}s"
                sleep "$delay"
            fi
            ;;
        esac
        # Subshells: a failing step (die) must not end the switch.
        case $action in
        ping) ;;
        off) (kill_node "$dir" "$i") 2>>"$dir/switch.log" || rc=1 ;;
        on) [[ -n $(holder_pid "$dir" "$i") ]] || (start_node "$dir" "$i") 2>>"$dir/switch.log" || rc=1 ;;
        reboot)
            (kill_node "$dir" "$i") 2>>"$dir/switch.log" || rc=1
            if [[ $TC_FENCE_REBOOT == restart ]]; then
                (start_node "$dir" "$i") 2>>"$dir/switch.log" || rc=1
            fi
            ;;
        status) [[ -n $(holder_pid "$dir" "$i") ]] || rc=2 ;;
        *) rc=1 ;;
        esac
        journal "$dir" "done $id $action $target rc=$rc"
        echo "$rc" >"$dir/ctl/.reply.$id"
        mv "$dir/ctl/.reply.$id" "$dir/ctl/reply.$id"
    done
}

# ---- subcommands ---------------------------------------------------------------------------------
cmd_up() {
    local dir=$1 i
    [[ ! -e /run/netns/$(ns_br "$dir") ]] || die "a cluster in $dir is up already (run down first)"
    for c in corosync pacemakerd cibadmin crm_attribute nsenter unshare ip; do
        command -v "$c" >/dev/null || [[ -x /usr/sbin/$c ]] ||
            die "$c not found: install corosync, pacemaker, pacemaker-cli-utils (bash ci/setup.sh)"
    done
    prepare_dir "$dir"
    net_up "$dir"
    TC_OWNER_PID=$TC_OWNER_PID TC_FENCE_REBOOT=$TC_FENCE_REBOOT \
        setsid "$SELF" _switch "$dir" </dev/null >>"$dir/switch.log" 2>&1 &
    echo $! >"$dir/switch.pid"
    for ((i = 1; i <= TC_NODES; i++)); do start_node "$dir" "$i"; done
    log "cluster up in $dir (namespaces $(prefix "$dir")-*, token ${TC_TOKEN} ms)"
}

cmd_down() {
    local dir=$1 n i p
    n=$(node_count "$dir")
    # The switch first, so that it restarts nothing.
    if [[ -f $dir/switch.pid ]]; then
        p=$(<"$dir/switch.pid")
        if [[ $(cmdline_of "$p") == *"_switch $dir"* ]]; then kill -TERM "$p" 2>/dev/null || true; fi
        rm -f "$dir/switch.pid"
    fi
    for ((i = 1; i <= n; i++)); do kill_node "$dir" "$i"; done
    for ((i = 1; i <= n; i++)); do ip netns del "$(ns_node "$dir" "$i")" 2>/dev/null || true; done
    ip netns del "$(ns_br "$dir")" 2>/dev/null || true
    rm -f "$dir/ctl/fence.fifo" "$dir/ctl/"reply.* "$dir/ctl/".reply.*
    log "cluster in $dir is down (logs in $dir/node*/log, $dir/switch.log)"
}

cmd_exec() {
    local dir=$1 i p
    i=$(node_index "$2")
    shift 2
    p=$(init_pid "$dir" "$i")
    [[ -n $p ]] || die "node$i is not running"
    # --pid makes nsenter fork, so that CMD really runs in the node's pid namespace.
    exec nsenter --target "$p" --net --mount --pid --uts --wd=/ -- "$@"
}

cmd_status() {
    local dir=$1 n i link
    n=$(node_count "$dir")
    for ((i = 1; i <= n; i++)); do
        link=down
        [[ $(ip -n "$(ns_br "$dir")" -o link show "p$i" 2>/dev/null) == *"state UP"* ]] && link=up
        echo "node$i: holder=$(holder_pid "$dir" "$i") init=$(init_pid "$dir" "$i") link=$link"
    done
}

usage() {
    sed -n '6,14p' "$SELF" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
cmd=$1
[[ $cmd != up ]] || mkdir -p "$2"
DIR=$(readlink -f "$2")
[[ -d $DIR ]] || die "no directory $2"
shift 2
case $cmd in
up) [[ $# -eq 0 ]] || usage; cmd_up "$DIR" ;;
down) [[ $# -eq 0 ]] || usage; cmd_down "$DIR" ;;
exec) [[ $# -ge 2 ]] || usage; cmd_exec "$DIR" "$@" ;;
kill) [[ $# -eq 1 ]] || usage; kill_node "$DIR" "$(node_index "$1")" ;;
cut) [[ $# -eq 1 ]] || usage; cut_node "$DIR" "$(node_index "$1")" ;;
start) [[ $# -eq 1 ]] || usage; start_node "$DIR" "$(node_index "$1")" ;;
status) [[ $# -eq 0 ]] || usage; cmd_status "$DIR" ;;
netns) [[ $# -eq 1 ]] || usage; echo "/run/netns/$(ns_node "$DIR" "$(node_index "$1")")" ;;
_node_init) node_init "$DIR" "$1" ;;
_switch) switch_daemon "$DIR" ;;
*) usage ;;
esac
