#!/usr/bin/env bash
# A manager and two agents on this machine, syncing a generated WSO2-like deployment tree over
# QUIC on loopback. Shows the initial sync, then an update that sends only what changed.
#
#   ./scripts/demo.sh            # builds (release) and runs; leaves its files in a temp dir
#   DEMO_DIR=/tmp/d ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (release)"
cargo build --release --quiet -p syncd -p syncd-devtools
BIN=$PWD/target/release
DIR=${DEMO_DIR:-$(mktemp -d /tmp/syncd-demo.XXXXXX)}
mkdir -p "$DIR"
cd "$DIR"
rm -rf mgr worker-1 worker-2 ./*.log
PORT=${DEMO_PORT:-17780}

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

say "generating a WSO2-like deployment tree in $DIR/mgr/server"
"$BIN/gen-tree" mgr/server --seed 1
echo "$(find mgr/server -type f | wc -l) files, $(du -sh mgr/server | cut -f1)"

say "creating node identities (syncd init)"
MGR_ID=$("$BIN/syncd" init --state-dir mgr/state 2>/dev/null | tail -1)
W1_ID=$("$BIN/syncd" init --state-dir worker-1/state 2>/dev/null | tail -1)
W2_ID=$("$BIN/syncd" init --state-dir worker-2/state 2>/dev/null | tail -1)
echo "mgr-1    $MGR_ID"; echo "worker-1 $W1_ID"; echo "worker-2 $W2_ID"

cat > mgr/syncd.toml <<TOML
[node]
name = "mgr-1"
state_dir = "state"
admin_socket = "admin.sock"

[manager]
listen = "127.0.0.1:$PORT"

[[manager.agents]]
name = "worker-1"
id = "$W1_ID"

[[manager.agents]]
name = "worker-2"
id = "$W2_ID"

[[folders]]
name = "deployment"
path = "server"
exclude = ["**/*.back", "work/**"]
TOML
for w in worker-1 worker-2; do
  cat > $w/syncd.toml <<TOML
[node]
name = "$w"
state_dir = "state"
admin_socket = "admin.sock"

[agent]
manager = "127.0.0.1:$PORT"
manager_id = "$MGR_ID"

[[folders]]
name = "deployment"
path = "server"
TOML
  "$BIN/syncd" check-config --config $w/syncd.toml
done
"$BIN/syncd" check-config --config mgr/syncd.toml

# Everything the product promises to reproduce: type, mode, mtime (ns), size, link target, bytes.
listing() { (cd "$1" && find . -mindepth 1 ! -path './.syncd-staging*' -printf '%P %y %m %T@ %s %l\n' | sort); }
converged() {
  for w in worker-1 worker-2; do
    [ -d $w/server ] || return 1
    diff -q <(listing mgr/server) <(listing $w/server) >/dev/null || return 1
    diff -rq --no-dereference mgr/server $w/server >/dev/null || return 1
  done
}
wait_converged() {
  local start
  start=$(date +%s.%N)
  for _ in $(seq 1 300); do
    if converged; then
      awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "both workers identical to the manager after %.2f s\n", e - s }'
      return 0
    fi
    sleep 0.1
  done
  echo "not converged; logs in $DIR"; exit 1
}

say "starting the manager and two agents"
SYNCD_LOG=info "$BIN/syncd" manager --config mgr/syncd.toml 2> mgr.log & PIDS+=($!)
for w in worker-1 worker-2; do
  SYNCD_LOG=info "$BIN/syncd" agent --config $w/syncd.toml 2> $w.log & PIDS+=($!)
done
wait_converged
grep -h "applied generation" worker-*.log | cut -c 29-

say "deploying on the manager while everything runs: one XML edited, one CAR added, one deleted"
sed -i 's/GET/POST/' mgr/server/synapse-configs/default/api/service-0001.xml
cp mgr/server/carbonapps/app-001_1.0.0.car mgr/server/carbonapps/orders_2.0.0.car
rm mgr/server/carbonapps/app-002_1.0.0.car
wait_converged
grep -h "applied generation" worker-*.log | grep -v "generation=1 " | cut -c 29-
echo "(bytes_fetched: chunk bytes sent over the network; bytes_reused: found on the worker already;"
echo " the new CAR is a copy of one the workers hold, so none of its bytes cross)"

say "a slow upload: 8 MiB written over 2 s is held on the manager until its writer closes it"
( exec 3> mgr/server/webapps/upload.bin
  for _ in 1 2 3 4 5 6 7 8; do head -c 1048576 /dev/urandom >&3; sleep 0.25; done
  exec 3>&- ) &
sleep 1
for w in worker-1 worker-2; do
  if [ -e $w/server/webapps/upload.bin ]; then echo "$w: upload visible while still being written!"; exit 1; fi
done
echo "after 1 s: not on any worker (still being written)"
wait $!
wait_converged

say "syncctl status on the manager"
"$BIN/syncctl" --socket mgr/admin.sock status

say "the update procedure: hold publication, deploy a patch, check nothing moved, resume, wait"
"$BIN/syncctl" --socket mgr/admin.sock pause
cp mgr/server/carbonapps/app-000_1.0.0.car mgr/server/carbonapps/app-000_1.0.1.car
sed -i 's/POST/PATCH/' mgr/server/synapse-configs/default/api/service-0001.xml
sleep 1
"$BIN/syncctl" --socket mgr/admin.sock status | sed -n '1,6p'
if [ -e worker-1/server/carbonapps/app-000_1.0.1.car ]; then echo "published during the hold!"; exit 1; fi
"$BIN/syncctl" --socket mgr/admin.sock resume
"$BIN/syncctl" --socket mgr/admin.sock wait --timeout 30s
wait_converged

say "pausing worker-2 from the manager; a hand edit there is listed (on it and on the manager), then backed up on resume"
"$BIN/syncctl" --socket mgr/admin.sock pause worker-2 --for 10m
sleep 0.5
echo '<api name="hand-edit"/>' > worker-2/server/synapse-configs/default/api/service-0002.xml
"$BIN/syncctl" --socket worker-2/admin.sock changes
# The paused worker reports what it finds (within about a second); the manager lists it.
for _ in $(seq 50); do
    "$BIN/syncctl" --socket mgr/admin.sock changes worker-2 | grep -q service-0002 && break
    sleep 0.1
done
"$BIN/syncctl" --socket mgr/admin.sock changes worker-2
"$BIN/syncctl" --socket mgr/admin.sock resume worker-2
"$BIN/syncctl" --socket mgr/admin.sock wait --timeout 30s
wait_converged
find worker-2/state/backups -type f | sed 's/^/backed up: /'

say "done; files and logs are in $DIR"
