#!/usr/bin/env bash
# A real single-node Slurm 22.05 cluster (with slurmdbd accounting on MariaDB) on this machine,
# for mucs' test suite and CI. Debian 12, root, no systemd, no cgroups needed.
# See shared/notes/slurm-local.md for the background.
#
#   bash scripts/slurm/local_cluster.sh install   # apt packages (skips what is installed)
#   bash scripts/slurm/local_cluster.sh start     # configs + daemons, waits for the node to be idle
#   bash scripts/slurm/local_cluster.sh stop      # stops only the daemons this script started
#   bash scripts/slurm/local_cluster.sh status    # exit 0: all up, 1: partly up, 3: nothing up
#
# All subcommands are idempotent. Daemons are started in the background (own session) with PID
# files in $MUCS_SLURM_RUN_DIR; stop signals only those PIDs, after checking /proc/PID/comm.
# A daemon of the same name that this script did not start is reused, never stopped.
#
# Environment: MUCS_SLURM_START_TIMEOUT (s, default 90), MUCS_SLURM_RUN_DIR (default
# /run/mucs-slurm), MUCS_SLURM_LOG_DIR (default /var/log/mucs-slurm).
set -euo pipefail
set +m

PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CLUSTER_NAME=mucs
PARTITION=debug
CONF_DIR=/etc/slurm          # where slurm's clients (sbatch, sacct, submitit) look by default
RUN_DIR=${MUCS_SLURM_RUN_DIR:-/run/mucs-slurm}
LOG_DIR=${MUCS_SLURM_LOG_DIR:-/var/log/mucs-slurm}
START_TIMEOUT=${MUCS_SLURM_START_TIMEOUT:-90}
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=mucs-local-slurmdbd  # local socket-only test database, not a secret
DB_SOCKET=/run/mysqld/mysqld.sock
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop is the reverse
MARK="# Written by mucs scripts/slurm/local_cluster.sh: edits are overwritten on start."

say() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }
need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

# ---------------------------------------------------------------------------------------- install
missing_pkgs() {
    local p out=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || out+=("$p")
    done
    echo "${out[@]:-}"
}

cmd_install() {
    need_root
    local missing t0
    missing=$(missing_pkgs)
    if [[ -z $missing ]]; then
        say "install: all packages already installed (${PKGS[*]})"
        return 0
    fi
    t0=$SECONDS
    mkdir -p "$LOG_DIR"
    local log=$LOG_DIR/install.log
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package lists do not know the packages yet (or an install fails).
    if ! apt-cache policy slurmctld 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        say "install: apt-get update"
        apt-get update -qq >>"$log" 2>&1 || { tail -20 "$log" >&2; die "apt-get update failed (log: $log)"; }
    fi
    say "install: apt-get install $missing"
    # shellcheck disable=SC2086
    if ! apt-get install -y -qq -o Dpkg::Use-Pty=0 $missing >>"$log" 2>&1; then
        say "install: first attempt failed, retrying after apt-get update"
        apt-get update -qq >>"$log" 2>&1 || true
        # shellcheck disable=SC2086
        apt-get install -y -qq -o Dpkg::Use-Pty=0 $missing >>"$log" 2>&1 \
            || { tail -20 "$log" >&2; die "apt-get install failed (log: $log)"; }
    fi
    missing=$(missing_pkgs)
    [[ -z $missing ]] || die "still missing after install: $missing (log: $log)"
    say "install: done in $((SECONDS - t0)) s ($(dpkg-query -W -f='${Version}' slurmctld) slurm)"
}

# ---------------------------------------------------------------------------------- pid helpers
pidfile() { echo "$RUN_DIR/$1.pid"; }

# Prints the PID of daemon $1 if this script started it and it is still that program.
our_pid() {
    local name=$1 f pid comm
    f=$(pidfile "$name")
    [[ -f $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    echo "$pid"
}

# Prints the PID of a daemon $1 that runs but was not started by this script.
foreign_pid() {
    local name=$1 ours pid
    ours=$(our_pid "$name" || true)
    for pid in $(pgrep -x "$name" 2>/dev/null || true); do
        [[ $pid == "$ours" ]] && continue
        echo "$pid"
        return 0
    done
    return 1
}

# running_pid NAME: ours or foreign
running_pid() { our_pid "$1" || foreign_pid "$1"; }

# launch NAME USER CMD...: start CMD in the background in its own session, PID file made by
# start-stop-daemon (it execs the program, so the PID is the daemon's own).
launch() {
    local name=$1 user=$2; shift 2
    local pid
    if pid=$(our_pid "$name"); then
        say "start: $name already running (pid $pid)"
        return 0
    fi
    if pid=$(foreign_pid "$name"); then
        say "start: $name already running (pid $pid, not started by this script: reusing it, stop leaves it)"
        return 0
    fi
    rm -f "$(pidfile "$name")"
    local chuid=()
    [[ $user != root ]] && chuid=(--chuid "$user")
    start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$(pidfile "$name")" \
        --output "$LOG_DIR/$name.out" "${chuid[@]}" --exec "$1" -- "${@:2}" \
        || die "could not launch $name (see $LOG_DIR/$name.out)"
    # make sure it survived its start-up
    local i
    for i in $(seq 1 20); do
        if pid=$(our_pid "$name"); then break; fi
        sleep 0.1
    done
    pid=$(our_pid "$name") || { tail -20 "$LOG_DIR/$name.out" >&2 || true; die "$name exited right after start (log: $LOG_DIR/$name.out)"; }
    say "start: $name started (pid $pid)"
}

# wait_for WHAT TIMEOUT CMD...: poll CMD until it succeeds.
wait_for() {
    local what=$1 timeout=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${timeout}s waiting for $what (logs: $LOG_DIR/*.out, /var/log/slurm/*.log)"
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------- configs
# install_file PATH MODE OWNER: content from stdin; only rewritten when it changed.
CHANGED=()
install_file() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$path"
        rm -f "$tmp"
        CHANGED+=("$path")
    fi
    chmod "$mode" "$path"; chown "$owner" "$path"
}

write_configs() {
    local host node_line mem_mb real_mem
    host=$(hostname -s)
    # CPU layout from slurmd -C (first line), without NodeName/RealMemory (set below).
    node_line=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    [[ -n $node_line ]] || die "slurmd -C gave no CPU layout"
    mem_mb=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
    real_mem=$((mem_mb * 80 / 100))

    mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
    chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm /run/slurm

    install_file "$CONF_DIR/slurm.conf" 0644 root:root <<EOF
$MARK
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups in this sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# scheduling: start jobs at once instead of every few seconds
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# jobs whose dependency can never be satisfied (afterok on a failed job) are cancelled instead of
# pending forever (since 21.08 this lives here; in SchedulerParameters it is silently ignored)
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
# cancelled jobs: SIGKILL 5 s after SIGTERM (submitit's job handler ignores SIGTERM)
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
# accounting (sacct is how submitit sees jobs that died without a result)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 ${node_line}RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    install_file "$CONF_DIR/slurmdbd.conf" 0600 slurm:slurm <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

# ------------------------------------------------------------------------------------------ start
node_state() { sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -1; }
node_usable() { case "$(node_state)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
node_idle() { [[ "$(node_state)" == idle ]]; }

cmd_start() {
    need_root
    [[ -z $(missing_pkgs) ]] || die "packages missing: $(missing_pkgs); run: bash $0 install"
    local t0=$SECONDS pid
    mkdir -p "$RUN_DIR" "$LOG_DIR"

    local all_up=1 d
    for d in "${DAEMONS[@]}"; do running_pid "$d" >/dev/null || all_up=0; done
    write_configs
    if ((${#CHANGED[@]})); then
        say "start: wrote ${CHANGED[*]}"
    fi
    local slurm_conf_changed=0 f
    for f in "${CHANGED[@]}"; do [[ $f == "$CONF_DIR/slurm.conf" ]] && slurm_conf_changed=1; done

    # munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
        say "start: created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    launch munged munge /usr/sbin/munged --foreground
    wait_for "munged" 20 bash -c 'munge -n | unmunge'

    # MariaDB for slurmdbd
    mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "start: initialising MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadbd.out" 2>&1 \
            || die "mariadb-install-db failed (log: $LOG_DIR/mariadbd.out)"
    fi
    launch mariadbd root /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$DB_SOCKET"
    wait_for "MariaDB" 60 mariadb-admin --socket="$DB_SOCKET" ping
    mariadb --socket="$DB_SOCKET" -uroot <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF

    # slurmdbd, then the cluster in the accounting DB
    launch slurmdbd root /usr/sbin/slurmdbd -D
    wait_for "slurmdbd (sacctmgr show cluster)" 60 sacctmgr -n -P show cluster
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i -Q add cluster "$CLUSTER_NAME" >/dev/null
        say "start: registered cluster '$CLUSTER_NAME' in slurmdbd"
    fi
    if ! sacctmgr -n -P show assoc where cluster="$CLUSTER_NAME" user=root format=user | grep -qx root; then
        sacctmgr -i -Q add user root account=root cluster="$CLUSTER_NAME" >/dev/null || true
    fi

    # slurmctld, slurmd
    launch slurmctld root /usr/sbin/slurmctld -D
    wait_for "slurmctld (scontrol ping)" 60 bash -c 'scontrol ping | grep -q UP'
    launch slurmd root /usr/sbin/slurmd -D
    if ((all_up && slurm_conf_changed)); then
        # daemons were running with the old file: have them re-read it (node or port changes
        # need stop + start)
        scontrol reconfigure >/dev/null && say "start: slurm.conf changed: ran scontrol reconfigure"
    fi

    # wait for the node
    local deadline=$((SECONDS + START_TIMEOUT)) resumed=0 state
    while :; do
        state=$(node_state || true)
        case "$state" in
            idle) break ;;
            mixed|allocated|completing) say "start: node is $state (jobs from before the restart)"; break ;;
            down*|drain*|drng*|fail*)
                if ((!resumed)); then
                    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        if ((SECONDS >= deadline)); then
            die "timed out after ${START_TIMEOUT}s waiting for node $(hostname -s) to be idle in sinfo (state: '${state:-none}'; logs: /var/log/slurm/slurmd.log, /var/log/slurm/slurmctld.log)"
        fi
        sleep 0.2
    done
    say "start: cluster '$CLUSTER_NAME' up in $((SECONDS - t0)) s: partition $PARTITION, node $(hostname -s) $state"
}

# ------------------------------------------------------------------------------------------- stop
stop_one() {
    local name=$1 pid f
    f=$(pidfile "$name")
    if ! pid=$(our_pid "$name"); then
        if [[ -f $f ]]; then rm -f "$f"; say "stop: $name not running (removed stale pid file)"; fi
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local t0=$SECONDS deadline=$((SECONDS + 30))
    while [[ -d /proc/$pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; do
        if ((SECONDS >= deadline)); then
            say "stop: $name (pid $pid) ignored SIGTERM for 30 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$f"
    say "stop: $name stopped (pid $pid, $((SECONDS - t0)) s)"
}

cmd_stop() {
    need_root
    local t0=$SECONDS any=0 i d
    for d in "${DAEMONS[@]}"; do our_pid "$d" >/dev/null && any=1; done
    if ((!any)); then
        for d in "${DAEMONS[@]}"; do rm -f "$(pidfile "$d")"; done
        say "stop: nothing to stop (no daemon started by this script is running)"
        return 0
    fi
    if our_pid slurmctld >/dev/null; then
        local n
        n=$(squeue -h 2>/dev/null | wc -l || echo 0)
        ((n == 0)) || say "stop: NOTE $n job(s) still queued/running; they stay in slurmctld's state"
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
    say "stop: done in $((SECONDS - t0)) s"
}

# ----------------------------------------------------------------------------------------- status
cmd_status() {
    local d pid up=0 n=${#DAEMONS[@]}
    for d in "${DAEMONS[@]}"; do
        if pid=$(our_pid "$d"); then
            say "status: $d running (pid $pid)"; up=$((up + 1))
        elif pid=$(foreign_pid "$d"); then
            say "status: $d running (pid $pid, not started by this script)"; up=$((up + 1))
        else
            say "status: $d not running"
        fi
    done
    if ((up == n)) && command -v sinfo >/dev/null; then
        local state
        state=$(node_state || true)
        say "status: partition $PARTITION, node $(hostname -s): ${state:-no answer from sinfo}; $(squeue -h 2>/dev/null | wc -l) job(s) in queue"
        case "$state" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
    fi
    ((up == 0)) && return 3
    return 1
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
