#!/bin/bash
# Times one worker joining a manager that is already running: the hand measurement behind
# BENCHMARKS.md "Session 9" (bench-rsync's "worker joining" row does the same, as a median).
#
#   target/release/gen-tree --scale medium /tmp/jt-base
#   scripts/join-timing.sh /tmp/jt-base 3          # three joins, one after another
#   LOG=debug scripts/join-timing.sh /tmp/jt-base 1 && grep -E 'staged a batch|committed' /tmp/jt/w0.log
#
# Each run: a fresh copy of the tree for the manager, a manager started and waited for until it
# has published, `sync` and a few seconds of quiet, then the agent started on an empty folder;
# prints the time until `syncctl wait --all` returns, the CPU both daemons used meanwhile (and
# their minor page faults since start), the machine's busy and idle CPU time over the same
# window, and each daemon's peak and (REST seconds later, 0 by default) resident memory.
# Earlier runs' directories (both trees: keep an eye on `df -h /`) are set aside as
# /tmp/jt.trash.* and deleted at the end: on this machine's ext4 (no journal), file
# creation runs up to 20x slower for minutes after a large deletion (see BENCHMARKS.md), so
# nothing is deleted between timed runs (KEEP=1 keeps them for a next invocation too). BIN and
# CTL pick the binaries; PORT the UDP port.
set -euo pipefail
BASE=${1:?usage: join-timing.sh BASE_TREE [RUNS]}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# Absolute: the daemons are started from their own directories.
BIN=$(realpath "${BIN:-$HERE/target/release/syncd}")
CTL=$(realpath "${CTL:-$HERE/target/release/syncctl}")
PORT=${PORT:-17760}
R=/tmp/jt
cpu() {
  for role in manager agent; do
    for p in $(pgrep -f "$role --config $R/" || true); do
      awk -v r=$role '{printf "%s=%.2fs faults=%d ", r, ($14+$15)/100, $10}' /proc/$p/stat
    done
  done
}
mem() {
  for role in manager agent; do
    for p in $(pgrep -f "$role --config $R/" || true); do
      awk -v r=$role '/^'"$1"':/ {printf "%s=%d MB ", r, $2/1024}' /proc/$p/status
    done
  done
}
stop() { pkill -f "config $R/" || true; sleep 0.3; }
trap stop EXIT
for run in $(seq "$RUNS"); do
  stop
  if [ -e $R ]; then mv $R "$R.trash.$(date +%s%N)"; fi
  mkdir -p $R/mgr $R/w0
  cp -a "$BASE" $R/mgr/server
  mid=$("$BIN" init --state-dir $R/mgr/state 2>/dev/null)
  id=$("$BIN" init --state-dir $R/w0/state 2>/dev/null)
  printf '[node]\nname = "w0"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n[agent]\nmanager = "127.0.0.1:%s"\nmanager_id = "%s"\n[[folders]]\nname = "deployment"\npath = "server"\n' "$PORT" "$mid" > $R/w0/syncd.toml
  printf '[node]\nname = "mgr"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n[manager]\nlisten = "127.0.0.1:%s"\n[[manager.agents]]\nname = "w0"\nid = "%s"\n[[folders]]\nname = "deployment"\npath = "server"\n' "$PORT" "$id" > $R/mgr/syncd.toml
  (cd $R/mgr && SYNCD_LOG=${LOG:-info} exec "$BIN" manager --config $R/mgr/syncd.toml >/dev/null 2>$R/mgr.log &)
  started=$SECONDS
  until "$CTL" --socket $R/mgr/admin.sock status --json 2>/dev/null | grep -q '"generation": *[1-9]'; do
    if [ $((SECONDS - started)) -gt 300 ] ||
      { [ $((SECONDS - started)) -ge 2 ] && ! pgrep -f "manager --config $R/" >/dev/null; }; then
      echo "join-timing: the manager did not publish (see $R/mgr.log)" >&2
      exit 1
    fi
    sleep 0.01
  done
  sync
  sleep "${SETTLE:-3}"
  before=$(cpu)
  s0=$(head -1 /proc/stat)
  t0=$(date +%s%N)
  (cd $R/w0 && SYNCD_LOG=${LOG:-info} exec "$BIN" agent --config $R/w0/syncd.toml >/dev/null 2>$R/w0.log &)
  "$CTL" --socket $R/mgr/admin.sock wait --all --timeout 300s >/dev/null
  t1=$(date +%s%N)
  s1=$(head -1 /proc/stat)
  machine=$(echo "$s0 $s1" | awk '{b=$2+$3+$4; bi=$5+$6; a=$13+$14+$15; ai=$16+$17; printf "machine busy %.2fs idle %.2fs", (a-b)/100, (ai-bi)/100}')
  after=$(cpu)
  peak=$(mem VmHWM)
  sleep "${REST:-0}"
  echo "join $run: $(( (t1 - t0) / 1000000 )) ms; cpu before: $before after: $after; $machine"
  echo "  memory: peak $peak; resident ${REST:-0} s later $(mem VmRSS)"
done
stop
[ -n "${KEEP:-}" ] || rm -rf $R.trash.*
