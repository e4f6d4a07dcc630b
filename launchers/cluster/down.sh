#!/usr/bin/env bash
# Stop the local SLURM cluster started by up.sh (jobs still running are killed with their slurmd).
#   launchers/cluster/down.sh           stop daemons, keep state (accounting DB, job history)
#   launchers/cluster/down.sh --purge   also delete $LEJEPA_SLURM_DIR, our /etc/hosts line and the
#                                       /etc/slurm/slurm.conf link
# munged is left running: it is the machine's own service and other software may use it.
set -euo pipefail
STATE=${LEJEPA_SLURM_DIR:-/var/tmp/lejepa-slurm}
RUN=$STATE/run

stop() {  # stop PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL; only the pid we recorded
  local pidfile=$1 name=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then echo "down.sh: $name ($pid) ignored SIGTERM, killing"; kill -9 "$pid" || true; fi
  fi
  rm -f "$pidfile"
}

# Cancel what is still queued or running while the controller can do it (slurmstepd outlives slurmd).
if [ -s "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
  jobs=$(SLURM_CONF=$STATE/etc/slurm.conf squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    SLURM_CONF=$STATE/etc/slurm.conf scancel $jobs || true
    for _ in $(seq 1 60); do [ -z "$(SLURM_CONF=$STATE/etc/slurm.conf squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
if [ -d "$RUN" ]; then
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$f" "$(basename "$f" .pid)"; done
  stop "$RUN/slurmctld.pid" slurmctld
  stop "$RUN/slurmdbd.pid" slurmdbd
  stop "$RUN/mariadb.pid" mariadb
fi
if [ "${1:-}" = --purge ]; then
  [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$STATE/etc/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
  sed -i '/# lejepa-slurm$/d' /etc/hosts 2>/dev/null || true
  rm -rf "$STATE"
  echo "down.sh: stopped and removed $STATE"
else
  echo "down.sh: stopped (state kept in $STATE; --purge removes it)"
fi
