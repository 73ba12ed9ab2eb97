#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for the integration tests (tests/it/slurm.rs) and CI.
#
#   tests/slurm/cluster.sh start    # munged + slurmctld + slurmd; waits until the node is idle
#   tests/slurm/cluster.sh status   # prints sinfo; exit 1 when the cluster does not answer
#   tests/slurm/cluster.sh stop     # ends the cluster's jobs, then stops the three daemons
#   tests/slurm/cluster.sh env      # prints `export SLURM_CONF=…` for this cluster
#
# $VLMPIPE_SLURM_DIR/driver-only is visible here and empty on the node (see `start`).
#
# Everything (munge key and socket, slurm.conf, spool, state, logs) lives under $VLMPIPE_SLURM_DIR
# (default /tmp/vlmpipe-slurm), never in /etc, so the machine's own Slurm setup is left alone; Slurm's
# commands find this cluster through SLURM_CONF=$VLMPIPE_SLURM_DIR/slurm.conf (the tests look there
# too). The node is this machine with its cores (`slurmd -C`); the daemons run as the calling user.
# `start` is idempotent: a cluster that answers is left running.
set -euo pipefail

DIR="${VLMPIPE_SLURM_DIR:-/tmp/vlmpipe-slurm}"
CTLD_PORT="${VLMPIPE_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${VLMPIPE_SLURMD_PORT:-6818}"
export SLURM_CONF="$DIR/slurm.conf"

need() {
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || { echo "cluster.sh: \`$c\` is not installed (apt-get install slurm-wlm munge)" >&2; exit 2; }
  done
}

# Stops the daemon in a pid file: TERM, then waits for it to go (KILL after 5 s).
stop_pidfile() {
  local pidfile="$1" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# The job steps (`slurmstepd`) of this cluster, and every process under them: a step carries the
# cluster's SLURM_CONF in its environment (slurmd passes its own on), which tells it from the steps
# of another cluster on this machine.
cluster_steps() {
  local p kids
  for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
    { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" || continue
    echo "$p"
    kids="$(pgrep -P "$p" 2>/dev/null || true)"
    while [ -n "$kids" ]; do
      echo "$kids"
      kids="$(for k in $kids; do pgrep -P "$k" 2>/dev/null || true; done)"
    done
  done
}

# Ends the jobs still running, so no step outlives the cluster. A step left behind reports "job N
# complete" to the next controller when its work ends, and that controller numbers its jobs from 1
# again (its state is not kept): it completes whatever new job has the same id, so a test's pending
# task shows as "cancelled" minutes after a restart. `scancel` lets Slurm end them (steps report to
# this controller); the steps still there after that (or of a controller that died) are killed.
end_jobs() {
  local left
  if alive "$DIR/slurmctld.pid"; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    # KillWait=5: a step that ignores SIGTERM gets SIGKILL after 5 s.
    for _ in $(seq 1 100); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && [ -z "$(cluster_steps)" ] && return 0
      sleep 0.1
    done
  fi
  left="$(cluster_steps)"
  [ -z "$left" ] && return 0
  # shellcheck disable=SC2086
  kill -TERM $left 2>/dev/null || true
  sleep 1
  left="$(cluster_steps)"
  # shellcheck disable=SC2086
  [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

write_conf() {
  local node hw user
  node="$(hostname -s)"
  # `slurmd -C` prints this machine's node line (CPUs, sockets, cores, memory).
  hw="$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')"
  user="$(id -un)"
  cat >"$SLURM_CONF" <<CONF
# Written by tests/slurm/cluster.sh: a one-node cluster on localhost.
ClusterName=vlmpipe
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in containers: track processes by their parent, bind nothing.
# Two stand-in GPUs (gres.conf): a job asking for GPUs (--gpus-per-task) is scheduled against
# them and gets SLURM_JOB_GPUS and CUDA_VISIBLE_DEVICES, as on a real GPU node.
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Cores are the consumable resource, so array tasks share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule and launch quickly: the tests submit many short tasks. Jobs start at the backfill pass,
# so bf_interval=1 (its minimum) bounds the wait to a second; measured (BENCHMARKS.md, Slurm):
# dropping defer_batch or batch_sched_delay=0 changed nothing, sched/builtin waited 2-3 s.
SchedulerParameters=defer_batch,sched_min_interval=100000,bf_interval=1
MessageTimeout=10
SlurmdTimeout=30
ReturnToService=2
MinJobAge=600
MaxArraySize=10001
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 $hw Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  # Beside slurm.conf, where slurmd looks for it.
  # Slurm drops GPUs without device files, and wants character devices: /dev/null and /dev/zero
  # stand in (nothing binds or opens them: TaskPlugin=task/none).
  cat >"$DIR/gres.conf" <<CONF
# Written by tests/slurm/cluster.sh: two stand-in GPUs.
AutoDetect=off
NodeName=$node Name=gpu File=/dev/null
NodeName=$node Name=gpu File=/dev/zero
CONF
}

start() {
  need munged slurmctld slurmd sinfo
  local t0 t1 state
  t0="$(date +%s.%N)"
  # Ask sinfo only when our controller is alive: without one it retries for seconds.
  if alive "$DIR/slurmctld.pid" && [ -n "$(node_state)" ]; then
    echo "slurm: already running (SLURM_CONF=$SLURM_CONF)"
    return 0
  fi
  # A half-started cluster from before: stop what is left, keep nothing of its state.
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
  chmod 700 "$DIR/munge"
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  write_conf
  mkdir -p "$DIR/spool/$(hostname -s)"
  slurmctld -i
  # The node gets its own mount namespace with an empty tmpfs over $DIR/driver-only: a folder the driver
  # sees and the workers do not, as a cache on a laptop's disk is for a real cluster's nodes (the
  # "cache the workers cannot see" test). Where namespaces are not allowed, slurmd runs plainly.
  mkdir -p "$DIR/driver-only"
  if ! unshare -m --propagation private sh -c "mount -t tmpfs none '$DIR/driver-only' && exec slurmd" 2>/dev/null; then
    slurmd
  fi
  # Wait until the node is idle (the controller has heard from slurmd).
  for _ in $(seq 1 300); do
    state="$(node_state)"
    case "$state" in idle*|mixed*) break ;; esac
    sleep 0.1
  done
  state="$(node_state)"
  case "$state" in
    idle*|mixed*) ;;
    *)
      echo "slurm: the node did not become idle (state: ${state:-none}); logs in $DIR/log" >&2
      tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
      return 1
      ;;
  esac
  # Idle is the controller's view of the node; wait until a job really runs there too (right after
  # a restart, the first jobs could fail while idle was already shown).
  if ! timeout 60 srun --quiet -N1 true >/dev/null 2>&1; then
    echo "slurm: the node is idle but a trivial job did not run; logs in $DIR/log" >&2
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    return 1
  fi
  t1="$(date +%s.%N)"
  echo "slurm: one-node cluster up in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s (SLURM_CONF=$SLURM_CONF)"
}

stop() {
  end_jobs
  # slurmd first, so no job step outlives the controller.
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munge/munged.pid"
  # State and spool hold nothing worth keeping: the next start begins clean.
  rm -rf "$DIR/state" "$DIR/spool"
  echo "slurm: stopped"
}

status() {
  if alive "$DIR/slurmctld.pid" && sinfo 2>/dev/null; then return 0; fi
  echo "slurm: not running (SLURM_CONF=$SLURM_CONF)" >&2
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
