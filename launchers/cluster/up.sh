#!/usr/bin/env bash
# Start a real, single-machine SLURM cluster for tests and for users without one.
#
#   sudo launchers/cluster/up.sh            # install (once), configure, start; prints how to use it
#   sudo launchers/cluster/down.sh [--purge]
#
# What runs (all traffic on loopback, all state under $LEJEPA_SLURM_DIR, default /var/tmp/lejepa-slurm):
#   munged (Debian's, default socket) -> MariaDB (own datadir, 127.0.0.1) -> slurmdbd (job accounting:
#   without it sacct knows nothing and submitit's job.result() can hang on a cancelled job) -> slurmctld ->
#   one slurmd per fake node (`slurmd -N nodeI`, Debian builds slurm with MULTIPLE_SLURMD).
# Every fake node claims $LEJEPA_SLURM_CPUS CPUs even when the machine has fewer: on a 2-core box two
# 2-CPU nodes oversubscribe the cores (SlurmdParameters=config_overrides), which is fine for tests.
# Idempotent: a second run with the same settings finds everything up and returns at once; changed
# settings restart the daemons with the new configuration.
set -euo pipefail
# The daemons started below must not inherit our caller's descriptors: a `flock LOCK up.sh` would otherwise
# leave LOCK held by mariadbd/slurmdbd for as long as the cluster runs.
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

STATE=${LEJEPA_SLURM_DIR:-/var/tmp/lejepa-slurm}
NODES=${LEJEPA_SLURM_NODES:-2}            # fake nodes node1..nodeN
CPUS=${LEJEPA_SLURM_CPUS:-2}              # CPUs each fake node offers
MEM_MB=${LEJEPA_SLURM_MEM_MB:-6000}       # memory each fake node offers (MB)
PORT=${LEJEPA_SLURM_PORT:-16817}          # slurmctld; slurmdbd +1, MariaDB +2, slurmd nodeI +10+I
PROCTRACK=${LEJEPA_SLURM_PROCTRACK:-auto}   # cgroup | linuxproc | auto (cgroup when usable)
CLUSTER=lejepa
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PKGS=(munge slurmctld slurmd slurmdbd slurm-client mariadb-server)

die() { echo "up.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons): sudo $0"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "LEJEPA_SLURM_NODES must be a positive integer, got '$NODES'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "LEJEPA_SLURM_CPUS must be a positive integer, got '$CPUS'"
[[ "$MEM_MB" =~ ^[1-9][0-9]*$ ]] || die "LEJEPA_SLURM_MEM_MB must be a positive integer, got '$MEM_MB'"

# --- 1. packages (skipped when installed) -----------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "up.sh: apt-get install ${missing[*]}"
  apt-get update -qq
  # The packages' own services must not start (no config yet; we start our own below). Containers
  # usually have a policy-rc.d saying so; add one for the install where there is none.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d; die "apt-get install ${missing[*]} failed"; }
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# --- 2. configuration --------------------------------------------------------------------------------
HOST=$(hostname -s)
CTLD_PORT=$PORT; DBD_PORT=$((PORT + 1)); DB_PORT=$((PORT + 2))
mkdir -p "$STATE"/{etc,log,run,ctld,spool,mysql}
ETC=$STATE/etc; LOG=$STATE/log; RUN=$STATE/run
export SLURM_CONF=$ETC/slurm.conf

render() {  # render TEMPLATE -> stdout, substituting @NAME@ placeholders
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
      -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
      -e "s|@PROCTRACK@|proctrack/$PROCTRACK|g" -e "s|@TASKPLUGIN@|$TASKPLUGIN|g" \
      -e "s|@NODES@|$NODES|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
      -e "s|@MEM_PER_CPU@|$((MEM_MB / CPUS))|g" -e "s|@COMM_PARAMS@|$COMM_PARAMS|g" "$1"
}
# Binding to "the address the name resolves to" is only loopback when the name resolves to 127.0.0.1
# (Debian often maps it to 127.0.1.1, where clients using 127.0.0.1 would not reach slurmctld).
if [ "$(getent ahostsv4 "$HOST" | awk 'NR == 1 {print $1}')" = 127.0.0.1 ]; then
  COMM_PARAMS="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
else
  COMM_PARAMS="# $HOST does not resolve to 127.0.0.1: daemons listen on all addresses (traffic stays local)"
fi
# proctrack/cgroup (what real clusters use) needs a writable cgroup v1 freezer hierarchy; slurm 22.05's
# cgroup/v2 plugin needs systemd/dbus, which containers lack, so elsewhere fall back to linuxproc
# (process tracking by parent pid, no memory containment).
if [ "$PROCTRACK" = auto ]; then
  probe=/sys/fs/cgroup/freezer/lejepa-probe.$$
  if mkdir "$probe" 2>/dev/null; then rmdir "$probe"; PROCTRACK=cgroup; else PROCTRACK=linuxproc; fi
fi
case $PROCTRACK in
  linuxproc) TASKPLUGIN=task/none ;;
  cgroup) TASKPLUGIN=task/cgroup ;;
  *) die "LEJEPA_SLURM_PROCTRACK must be linuxproc or cgroup, got '$PROCTRACK'" ;;
esac
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
render "$HERE/slurm.conf.in" > "$new/slurm.conf"
for i in $(seq 1 "$NODES"); do
  echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 10 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
done >> "$new/slurm.conf"
render "$HERE/slurmdbd.conf.in" > "$new/slurmdbd.conf"
render "$HERE/cgroup.conf.in" > "$new/cgroup.conf"

alive() {  # the pid in file $1 runs (a killed daemon can linger a moment as a zombie: not alive)
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
all_up() {
  alive "$RUN/mariadb.pid" && alive "$RUN/slurmdbd.pid" && alive "$RUN/slurmctld.pid" || return 1
  for i in $(seq 1 "$NODES"); do alive "$RUN/slurmd-node$i.pid" || return 1; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && scontrol ping >/dev/null 2>&1
}
same_config() { for f in slurm.conf slurmdbd.conf cgroup.conf; do cmp -s "$new/$f" "$ETC/$f" || return 1; done; }

if all_up && same_config; then
  echo "up.sh: cluster '$CLUSTER' already running ($NODES nodes, state in $STATE)"
  exit 0
fi
# Something is down or the settings changed: stop what runs and start everything afresh.
LEJEPA_SLURM_DIR=$STATE "$HERE/down.sh" >/dev/null
install -m 644 "$new/slurm.conf" "$new/cgroup.conf" "$ETC/"
install -m 600 "$new/slurmdbd.conf" "$ETC/"   # slurmdbd refuses a config others can read (it has a password)

# The fake node names must resolve like a real cluster's DNS: MASTER_ADDR for torch.distributed is the
# first node's name. Our lines in /etc/hosts carry a marker so down.sh --purge can remove them.
sed -i '/# lejepa-slurm$/d' /etc/hosts
echo "127.0.0.1 $(for i in $(seq 1 "$NODES"); do printf 'node%s ' "$i"; done)# lejepa-slurm" >> /etc/hosts

# Clients (sbatch, squeue, submitit) find the config through /etc/slurm/slurm.conf; we only take that
# path when it is free or already ours, and never overwrite a real cluster's configuration.
if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ]; then
  mkdir -p /etc/slurm && ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
  CLIENT_HINT=""
else
  CLIENT_HINT="export SLURM_CONF=$ETC/slurm.conf   # /etc/slurm/slurm.conf belongs to another cluster"
fi

wait_for() {  # wait_for SECONDS DESCRIPTION LOGFILE COMMAND...
  local t=$1 what=$2 log=$3; shift 3
  for _ in $(seq 1 $((t * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "up.sh: $what did not come up within ${t}s; last lines of $log:" >&2
  tail -n 20 "$log" >&2 || true
  exit 1
}

# --- 3. munge (shared by all daemons and clients on this machine) -------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then  # the package normally creates it
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  wait_for 10 munged /var/log/munge/munged.log bash -c 'munge -n | unmunge'
fi

# --- 4. MariaDB for accounting (own datadir, loopback TCP only) -------------------------------------
DB=$STATE/mysql
if [ ! -d "$DB/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$DB" --user=root --auth-root-authentication-method=normal \
    --skip-test-db > "$LOG/mariadb-install.log" 2>&1 || { tail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
fi
setsid mariadbd --no-defaults --user=root --datadir="$DB" --bind-address=127.0.0.1 --port="$DB_PORT" \
  --socket="$RUN/mysqld.sock" --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
  --innodb-buffer-pool-size=64M --skip-name-resolve </dev/null >/dev/null 2>&1 &
wait_for 60 MariaDB "$LOG/mariadb.log" mariadb --no-defaults --socket="$RUN/mysqld.sock" -uroot -e 'select 1'
mariadb --no-defaults --socket="$RUN/mysqld.sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'lejepa-slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- 5. slurmdbd, slurmctld, one slurmd per node ------------------------------------------------------
slurmdbd </dev/null >/dev/null 2>&1   # daemonizes; finds slurmdbd.conf beside $SLURM_CONF, writes $RUN/slurmdbd.pid
wait_for 60 slurmdbd "$LOG/slurmdbd.log" sacctmgr -n list cluster
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true   # "already exists" is fine
slurmctld -f "$ETC/slurm.conf" </dev/null >/dev/null 2>&1
wait_for 60 slurmctld "$LOG/slurmctld.log" scontrol ping
for i in $(seq 1 "$NODES"); do
  slurmd -f "$ETC/slurm.conf" -N "node$i" </dev/null >/dev/null 2>&1
done
ready() { [ "$(sinfo -h -N -p main -t idle,mix,alloc -o %N | sort -u | wc -l)" -ge "$NODES" ]; }
wait_for 60 "slurmd (all $NODES nodes idle)" "$LOG/slurmd-node1.log" ready

echo "up.sh: cluster '$CLUSTER' up: $NODES nodes x $CPUS CPUs x ${MEM_MB} MB, partitions main (default) + preempt; state in $STATE"
[ -z "$CLIENT_HINT" ] || echo "up.sh: $CLIENT_HINT"
sinfo
