#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and demos:
#
#   slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, configure, start, wait until idle
#   slurm/local_cluster.sh status   # daemons and sinfo; exit 0 when the node is up
#   slurm/local_cluster.sh stop     # cancel jobs, shut the daemons down
#
# Needs root. Works without systemd (containers, VMs booted without init): the daemons are
# started directly and tracked by their pid files. Idempotent: `start` twice is fine.
# Writes /etc/slurm/slurm.conf (the path Debian's Slurm reads) but never over a file it did not write.
set -euo pipefail

STATE=${FEDEMU_SLURM_STATE:-/var/spool/fedemu-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by fedemu slurm/local_cluster.sh"
HOST=$(hostname -s)
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$STATE/slurmctld.pid
SLURMD_PID=$STATE/slurmd.pid
WAIT_S=${FEDEMU_SLURM_WAIT_S:-90}

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# The pid in FILE when that process is alive and runs PROG (a stale pid file is not a daemon).
running_pid() {
    local file=$1 prog=$2 pid
    [ -r "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$prog" ] || return 1
    echo "$pid"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    say "installing slurm-wlm and munge (apt-get)"
    # No init system here: keep package scripts from trying to start services.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || apt-get update
    local rc=0
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || rc=$?
    [ "$made_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install slurm-wlm munge failed (exit $rc)"
}

write_conf() {
    # `slurmd -C` measures the node (CPUs, sockets, cores, threads, RealMemory) the way slurmd will.
    local node
    node=$(slurmd -C 2>/dev/null | grep '^NodeName=' | sed -e "s/^NodeName=[^ ]*/NodeName=$HOST/")
    [ -n "$node" ] || die "slurmd -C printed no NodeName line"
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d"
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away to use the local cluster"
    fi
    local tmp
    tmp=$(mktemp "$CONF.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER: a one-node test cluster, rewritten by every start.
ClusterName=fedemu-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups (containers rarely allow them) and no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down because its slurmd stopped comes back when slurmd registers again.
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for 10 minutes (no accounting to ask later).
MinJobAge=600
KillWait=30
InactiveLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$tmp"
    if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        CONF_CHANGED=0
    else
        mv "$tmp" "$CONF"
        CONF_CHANGED=1
    fi
}

start_munge() {
    if running_pid "$MUNGE_PID" munged >/dev/null; then
        return 0
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating the munge key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge
    say "starting munged (as $user)"
    if [ "$user" = root ]; then
        munged --force
    else
        runuser -u munge -- munged
    fi
    touch "$STATE/munged.ours"  # `stop` leaves alone a munged that it did not start
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and runs the daemons as root)"
    install_packages
    write_conf
    start_munge
    if ! running_pid "$CTLD_PID" slurmctld >/dev/null; then
        say "starting slurmctld"
        slurmctld
    elif [ "$CONF_CHANGED" = 1 ]; then
        scontrol reconfigure
    fi
    if ! running_pid "$SLURMD_PID" slurmd >/dev/null; then
        say "starting slurmd"
        slurmd
    fi
    local state="" deadline=$((SECONDS + WAIT_S)) resumed=0
    while [ "$SECONDS" -lt "$deadline" ]; do
        state=$(node_state)
        case "$state" in
            idle | mix | alloc | comp) say "node $HOST is $state"; return 0 ;;
            down | down\* | drain | drain\* | drng | fail | unk\*)
                # Left down by an earlier stop or crash: once slurmd answers, put it back in service.
                if [ "$resumed" = 0 ] && running_pid "$SLURMD_PID" slurmd >/dev/null; then
                    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 && resumed=1
                fi ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "node $HOST not idle after ${WAIT_S}s (state: ${state:-none}; logs above)"
}

stop_pid() {  # stop_pid FILE PROG: TERM, then KILL after 15 s
    local pid
    pid=$(running_pid "$1" "$2") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 150); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    [ "$(id -u)" = 0 ] || die "stop needs root"
    if running_pid "$CTLD_PID" slurmctld >/dev/null; then
        # Jobs would otherwise survive in the saved state and start again with the next cluster.
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 100); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
        say "stopping slurmctld and slurmd"
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    if [ -e "$STATE/munged.ours" ] && running_pid "$MUNGE_PID" munged >/dev/null; then
        say "stopping munged"
        stop_pid "$MUNGE_PID" munged
    fi
    rm -f "$STATE/munged.ours"
    say "stopped"
}

status() {
    local ok=0 pid file prog
    for pair in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
        read -r file prog <<<"$pair"
        if pid=$(running_pid "$file" "$prog"); then
            echo "$prog: running (pid $pid)"
        else
            echo "$prog: not running"
            ok=1
        fi
    done
    [ "$ok" = 0 ] || return 1
    sinfo
    case "$(node_state)" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
