#!/usr/bin/env bash
# Operations on a folder of 100,000 files, timed on a manager and two agents on loopback
# (BENCHMARKS.md "Session 21"): a directory of them renamed then `syncctl wait`, an `rm -rf`
# of them (the delete guard must hold nearly all of it), a worker paused, every file touched
# on it, then resumed (its local changes backed up). Observations, not targets.
#
#   scripts/hundred-k.sh [BIN_DIR] [WORK_DIR]     # BIN_DIR holds syncd and syncctl
#                                                  # (default target/release); ~3 min
set -euo pipefail
BIN=$(realpath "${1:-target/release}")
WORK=${2:-/tmp/hundred-k}
PORT=${PORT:-17795}
FILES_DIRS=100 # directories of 1,000 files each

ctl() { "$BIN/syncctl" --socket "$WORK/$1/admin.sock" "${@:2}"; }
count() { find "$WORK/$1/server" -type f | wc -l; }
secs() { echo "$EPOCHREALTIME"; }
took() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }'; }

stop() { pkill -f "syncd (agent|manager) --config $WORK/" || true; }
trap stop EXIT
stop
rm -rf "$WORK"
mkdir -p "$WORK"/{mgr,worker-1,worker-2}/server
ids=()
for n in mgr worker-1 worker-2; do
  ids+=("$("$BIN/syncd" init --state-dir "$WORK/$n/state" 2>/dev/null | tail -1)")
done
cat >"$WORK/mgr/syncd.toml" <<TOML
[node]
name = "mgr"
state_dir = "$WORK/mgr/state"
admin_socket = "$WORK/mgr/admin.sock"
[manager]
listen = "127.0.0.1:$PORT"
[[manager.agents]]
name = "worker-1"
id = "${ids[1]}"
[[manager.agents]]
name = "worker-2"
id = "${ids[2]}"
[[folders]]
name = "deployment"
path = "$WORK/mgr/server"
TOML
for w in worker-1 worker-2; do
  cat >"$WORK/$w/syncd.toml" <<TOML
[node]
name = "$w"
state_dir = "$WORK/$w/state"
admin_socket = "$WORK/$w/admin.sock"
[agent]
manager = "127.0.0.1:$PORT"
manager_id = "${ids[0]}"
[[folders]]
name = "deployment"
path = "$WORK/$w/server"
TOML
done
start() {
  RUST_LOG=info setsid "$BIN/syncd" "$2" --config "$WORK/$1/syncd.toml" >>"$WORK/$1.log" 2>&1 &
}
start mgr manager
start worker-1 agent
start worker-2 agent
sleep 1.5

make_tree() {
  python3 - "$WORK/mgr/server/$1" "$FILES_DIRS" <<'EOF'
import os, sys
root, dirs = sys.argv[1], int(sys.argv[2])
for t in range(dirs):
    d = f"{root}/{t}/synapse-configs/default/api"
    os.makedirs(d, exist_ok=True)
    for i in range(1000):
        with open(f"{d}/api{i}.xml", "w") as f:
            f.write(f'<api name="t{t}-{i}" context="/t{t}/api{i}">\n' + "x" * (500 + i % 700) + "\n</api>\n")
EOF
}

t=$(secs); make_tree tenants; ctl mgr wait --timeout 900s >/dev/null
echo "created $(count mgr) files, every worker has them: $(took "$t")"

t=$(secs); mv "$WORK/mgr/server/tenants" "$WORK/mgr/server/tenants-moved"
ctl mgr wait --timeout 900s >/dev/null
echo "directory of 100,000 files renamed, then wait: $(took "$t")"
grep "folder changed" "$WORK/mgr.log" | tail -1 | sed 's/^/  manager: /'
grep "applied generation" "$WORK/worker-1.log" | tail -1 | sed 's/^/  worker-1: /'

t=$(secs); rm -rf "$WORK/mgr/server/tenants-moved"
echo "rm -rf of them: $(took "$t")"
sleep 3
echo "  worker-2 keeps $(count worker-2) files until confirmed; $(ctl mgr status | grep 'DELETE GUARD' || echo 'NO GUARD')"
ctl mgr confirm deployment >/dev/null; ctl mgr wait --timeout 300s >/dev/null

make_tree tenants; ctl mgr wait --timeout 900s >/dev/null
ctl worker-2 pause >/dev/null
find "$WORK/worker-2/server/tenants" -type f -exec touch {} +
sleep 10
echo "worker-2 paused, all touched: $(ctl mgr status | grep -c 'drift:') drift lines in status; $(grep -c 'exceeds the frame limit' "$WORK/worker-2.log" || true) oversized reports"
t=$(secs); ctl worker-2 resume | tail -1
echo "  resume (backup of every touched file): $(took "$t")"
