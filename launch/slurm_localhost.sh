#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this machine, to try launch/slurm.sbatch without a cluster.
#
#   launch/slurm_localhost.sh start DIR     # prints `export SLURM_CONF=DIR/slurm.conf`
#   SLURM_CONF=DIR/slurm.conf sbatch --nodes 2 launch/slurm.sbatch train.steps=20 ...
#   launch/slurm_localhost.sh stop DIR
#
# Needs root and Debian's slurm-wlm and munge packages (slurmctld, slurmd, munged). Everything
# lives in DIR: its own munge key and socket, state, logs, and two nodes n1 and n2 that are two
# slurmd daemons on 127.0.0.1 with one CPU each (CPUS_PER_NODE to change), so a 2-node job runs
# one launcher per "node" exactly as on a cluster. Ports: CTLD_PORT (default 16817), and the
# two slurmd daemons take the next two.
set -euo pipefail
action="${1:?usage: slurm_localhost.sh start|stop DIR}"
dir="$(mkdir -p "${2:?usage: slurm_localhost.sh start|stop DIR}" && cd "$2" && pwd)"

stop() {
    # Jobs first: their slurmstepd processes would outlive slurmd.
    if [ -f "$dir/slurm.conf" ] && SLURM_CONF="$dir/slurm.conf" scancel --user "$(id -un)" 2>/dev/null; then
        for _ in $(seq 20); do
            [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    for pid_file in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
    done
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
[ "$action" = start ] || { echo "error: unknown action '$action' (start or stop)" >&2; exit 2; }
for program in munged slurmctld slurmd; do
    command -v "$program" >/dev/null || { echo "error: $program not found (apt-get install slurm-wlm munge)" >&2; exit 2; }
done

ctld_port="${CTLD_PORT:-16817}"
cpus="${CPUS_PER_NODE:-1}"
mkdir -p "$dir/state" "$dir/log"
[ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom >"$dir/munge.key"; chmod 600 "$dir/munge.key"; }
munged --force --socket "$dir/munge.socket" --key-file "$dir/munge.key" \
    --pid-file "$dir/munged.pid" --log-file "$dir/log/munged.log" --seed-file "$dir/munged.seed"

cat >"$dir/slurm.conf" <<EOF
ClusterName=localhost
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldPort=$ctld_port
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((ctld_port + 1)) CPUs=$cpus RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((ctld_port + 2)) CPUs=$cpus RealMemory=2000 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -i
slurmd -N n1
slurmd -N n2
for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" = idle ]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "error: the local Slurm nodes did not come up; see $dir/log/" >&2
stop
exit 1
