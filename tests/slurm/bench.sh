#!/bin/bash
# Slurm against local: the quickstart's `baseline` eval as 4 shards on the cluster of cluster.sh
# (started) and in one process, release binary (cargo build --release), 3 rounds per size
# (BENCHMARKS.md, "Slurm"). Works in a temporary folder of its own.
set -u
B="${VLMPIPE_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/vlmpipe}"
P="$(mktemp -d)"; trap 'rm -rf "$P"' EXIT; cp "$(cd "$(dirname "$0")/../.." && pwd)/examples/quickstart.vp" $P/; cd $P
export SLURM_CONF="${SLURM_CONF:-/tmp/vlmpipe-slurm/slurm.conf}" HF_HUB_OFFLINE=1
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1 || echo "FAILED: $*"; echo "$(date +%s.%N) - $s" | bc; }
for size in "32:" "128:--set n_images=640 --set n_eval=128" "256:--set n_images=1280 --set n_eval=256"; do
  n=${size%%:*}; sets=${size#*:}
  $B run quickstart.vp --cache-dir cache --only baseline --quiet $sets >/dev/null 2>&1
  rm -f cache/slurm/probe-passed
  first=$(t $B run quickstart.vp --cache-dir cache --only baseline --force baseline --quiet --executor slurm --shards 4 $sets)
  echo "rows $n: slurm with the probe: $first"
  for r in 1 2 3; do
    l=$(t $B run quickstart.vp --cache-dir cache --only baseline --force baseline --quiet --executor local $sets)
    s=$(t $B run quickstart.vp --cache-dir cache --only baseline --force baseline --quiet --executor slurm --shards 4 $sets)
    echo "rows $n round $r: local $l slurm $s ratio $(echo "scale=2; $s / $l" | bc)"
  done
done
uptime
