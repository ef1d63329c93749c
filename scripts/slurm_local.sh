#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, without systemd or cgroups, for kvbench's sweep tests and for
# trying `hydra/launcher=slurm` on a laptop or CI box (Debian/Ubuntu, root).
#
#   bash scripts/slurm_local.sh up       install (apt) if missing, start munge + slurmctld + slurmd, quick check
#   bash scripts/slurm_local.sh check    sinfo, srun, sbatch (waited for) and sacct
#   bash scripts/slurm_local.sh status   daemons, node and queue
#   bash scripts/slurm_local.sh stop     stop slurmd, slurmctld and munged (by their recorded PIDs)
#
# It never replaces a slurm.conf it did not write (exit code 3; SLURM_LOCAL_FORCE=1 overrides), so running it on a
# node of a real cluster does nothing. Idempotent: `up` on a running cluster with an unchanged slurm.conf only checks it (< 1 s); a changed conf is
# rewritten and the daemons restarted. Job ids and state survive stop/up (StateSaveLocation).
#
# Without slurmdbd, `sacct` answers "accounting storage is disabled", so submitit (which polls sacct) cannot see
# that a job died and a Hydra sweep waits forever. We install a small /usr/local/bin/sacct shim that answers
# submitit's query (`sacct -o JobID,State,NodeList --parsable2 -j ...`) from `scontrol -o show job` and hands
# over to the real sacct whenever accounting is enabled. MinJobAge=3600 keeps finished jobs visible to scontrol for
# longer than submitit's longest poll gap (600 s). SLURM_LOCAL_NO_SACCT_SHIM=1 skips the shim.
#
# Environment: SLURM_LOCAL_FULL=1 installs the slurm-wlm metapackage (all plugins) instead of the 4 packages;
# SLURM_LOCAL_CPUS / SLURM_LOCAL_MEM_MB cap what the node offers (default: all cores, 95 % of memory);
# SLURM_LOCAL_REQUEUE_DELAY_S (default 5; Slurm's default is 120) is how long a requeued job waits before it may
# start again (AuthInfo=cred_expire, which is also the job-step credential lifetime). The scheduler looks at
# pending jobs every 2 s (sched_interval; default 60), so a requeued job starts again within seconds.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
RUN=/run/slurm-local
LOG=/var/log/slurm
SHIM=/usr/local/bin/sacct
SHIM_MARK="kvbench sacct shim"

say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (apt-get install, daemons in /run and /var); rerun with sudo"; }

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing (install slurmctld, slurmd, slurm-client, munge)"
    say "installing Slurm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    if [ "${SLURM_LOCAL_FULL:-0}" = 1 ]; then
        apt-get install -y -q slurm-wlm munge >/dev/null
    else
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || /usr/sbin/mungekey -c; }
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
        for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    if [ -s /run/munge/munged.pid ]; then cp /run/munge/munged.pid "$RUN/munged.pid"; fi
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
}

# slurm.conf for this machine: one node `localhost` with the cores/memory `slurmd -C` reports.
render_conf() {
    local hw cpus sockets cores threads mem
    hw=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(( ${SLURM_LOCAL_MEM_MB:-$(( mem * 95 / 100 ))} ))
    local node="CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
    if [ -n "${SLURM_LOCAL_CPUS:-}" ]; then node="CPUs=$SLURM_LOCAL_CPUS"; fi
    cat <<EOF
# written by kvbench scripts/slurm_local.sh (single node, no systemd, no cgroups, no accounting database)
ClusterName=kvbench
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${SLURM_LOCAL_REQUEUE_DELAY_S:-5}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=3600
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 $node RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

install_shim() {
    if [ "${SLURM_LOCAL_NO_SACCT_SHIM:-0}" = 1 ]; then
        if grep -qs "$SHIM_MARK" "$SHIM"; then rm -f "$SHIM"; fi
        return
    fi
    if [ -e "$SHIM" ] && ! grep -qs "$SHIM_MARK" "$SHIM"; then
        say "warning: $SHIM exists and is not ours; leaving it"
        return
    fi
    cat >"$SHIM.tmp" <<'EOF'
#!/usr/bin/env bash
# kvbench sacct shim (scripts/slurm_local.sh): without an accounting database, answer the job-state queries that
# submitit makes (-o FIELDS --parsable2 -j IDS) from `scontrol -o show job`; use the real sacct otherwise.
if ! scontrol show config 2>/dev/null | grep -Eq '^AccountingStorageType += accounting_storage/none'; then
    exec /usr/bin/sacct "$@"
fi
fields="JobID,JobName,Partition,State,ExitCode"; ids=(); sep="|"; trail=""; header=1; fixed=1
while [ $# -gt 0 ]; do
    case "$1" in
        -o|--format) fields="$2"; shift ;;
        --format=*) fields="${1#*=}" ;;
        -j|--jobs) IFS=, read -ra more <<<"$2"; ids+=("${more[@]}"); shift ;;
        --jobs=*) IFS=, read -ra more <<<"${1#*=}"; ids+=("${more[@]}") ;;
        -P|--parsable2) fixed=0 ;;
        -p|--parsable) fixed=0; trail="|" ;;
        -n|--noheader) header=0 ;;
        *) ;;
    esac
    shift
done
if [ ${#ids[@]} -eq 0 ]; then
    records=$(scontrol -o show job 2>/dev/null || true)
else
    records=$(for id in "${ids[@]}"; do scontrol -o show job "${id%%.*}" 2>/dev/null || true; done)
fi
grep -v '^No jobs' <<<"$records" | awk -v fields="$fields" -v header="$header" -v trail="$trail" -v fixed="$fixed" '
BEGIN { n = split(fields, f, ","); if (header) { line = ""; for (i = 1; i <= n; i++) line = line (i > 1 ? "|" : "") f[i]; print line trail } }
NF == 0 { next }
{
    delete kv
    for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) kv[substr($i, 1, p - 1)] = substr($i, p + 1) }
    id = kv["JobId"]
    if (("ArrayJobId" in kv) && ("ArrayTaskId" in kv))
        id = kv["ArrayJobId"] "_" (kv["ArrayTaskId"] ~ /^[0-9]+$/ ? kv["ArrayTaskId"] : "[" kv["ArrayTaskId"] "]")
    nodes = kv["NodeList"]; if (nodes == "" || nodes == "(null)") nodes = "None assigned"
    line = ""
    for (i = 1; i <= n; i++) {
        name = f[i]; sub(/%.*/, "", name); v = ""
        if (name == "JobID" || name == "JobIDRaw") v = id
        else if (name == "State") v = kv["JobState"]
        else if (name == "NodeList") v = nodes
        else if (name == "Elapsed") v = kv["RunTime"]
        else if (name == "Timelimit") v = kv["TimeLimit"]
        else if (name in kv) v = kv[name]
        line = line (i > 1 ? "|" : "") v
    }
    print line trail
}'
EOF
    chmod 0755 "$SHIM.tmp"
    mv "$SHIM.tmp" "$SHIM"
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

start_daemons() {
    install -d "$RUN" "$LOG" /var/spool/slurmctld /var/spool/slurmd
    if ! alive slurmctld; then
        setsid nohup slurmctld -D >>"$LOG/slurmctld.out" 2>&1 </dev/null &
        echo $! >"$RUN/slurmctld.pid"
    fi
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    scontrol ping | grep -q UP || die "slurmctld did not come up (see $LOG/slurmctld.log)"
    if ! alive slurmd; then
        setsid nohup slurmd -D -N localhost >>"$LOG/slurmd.out" 2>&1 </dev/null &
        echo $! >"$RUN/slurmd.pid"
    fi
    local state=""
    for _ in $(seq 150); do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*|completing*) return ;;
            down*|drain*|fail*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "node localhost is '$state', not idle (see $LOG/slurmd.log and $LOG/slurmctld.log)"
}

stop_daemons() {
    local d pid
    for d in slurmd slurmctld munged; do
        if alive "$d"; then
            pid=$(cat "$RUN/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
            say "stopped $d ($pid)"
        fi
        rm -f "$RUN/$d.pid"
    done
}

quick_check() {
    sinfo
    [ "$(srun -N1 -n1 -t 1 hostname)" = "$(hostname)" ] || die "srun hostname failed"
}

full_check() {
    quick_check
    local out jid state
    out=$(mktemp)
    jid=$(sbatch --parsable -t 1 -o "$out" --wrap 'echo kvbench-slurm-ok')
    for _ in $(seq 300); do
        state=$(scontrol -o show job "$jid" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
        case "$state" in PENDING|RUNNING|COMPLETING|CONFIGURING) sleep 0.1 ;; *) break ;; esac
    done
    grep -q kvbench-slurm-ok "$out" || die "sbatch job $jid wrote no output"
    rm -f "$out"
    state=$(sacct -n -P -o State -j "$jid" | head -1)
    [ "$state" = COMPLETED ] || die "sacct says job $jid is '$state', expected COMPLETED"
    say "sbatch job $jid COMPLETED (sacct agrees)"
}

up() {
    need_root
    install_packages
    install -d "$RUN" "$LOG" /etc/slurm
    start_munge
    if [ -s "$CONF" ] && ! grep -q "^# written by kvbench scripts/slurm_local.sh" "$CONF" \
        && [ "${SLURM_LOCAL_FORCE:-0}" != 1 ]; then
        echo "[slurm_local] error: $CONF was not written by this script (a real cluster?); refusing to replace it" \
             "(SLURM_LOCAL_FORCE=1 overrides)" >&2
        exit 3
    fi
    local want
    want=$(render_conf)
    if [ "$(cat "$CONF" 2>/dev/null)" != "$want" ]; then
        say "writing $CONF"
        printf '%s\n' "$want" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
        for d in slurmd slurmctld; do
            if alive "$d"; then kill "$(cat "$RUN/$d.pid")"; fi
        done
        for _ in $(seq 50); do alive slurmd || alive slurmctld || break; sleep 0.1; done
    fi
    install_shim
    start_daemons
    quick_check
    say "up (stop with: bash $0 stop)"
}

case "${1:-up}" in
    up) up ;;
    check) full_check ;;
    status)
        for d in munged slurmctld slurmd; do
            if alive "$d"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: not running"; fi
        done
        sinfo 2>/dev/null && squeue 2>/dev/null || true ;;
    stop) need_root; stop_daemons ;;
    *) die "usage: $0 up|check|status|stop" ;;
esac
