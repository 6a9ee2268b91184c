#!/usr/bin/env bash
# Bytes on an Ethernet-sized link for a new archive of incompressible bytes: syncd against
# rsync and lsyncd, in one run. bench-rsync counts bytes on loopback, whose 64 KB MTU lets TCP
# carry a 5 MB file in about 80 segments while QUIC's packets stay at most 6,500 bytes; on a
# real network both are cut to the link's MTU. Here the worker is a network namespace behind a
# veth pair with MTU 1500 (MTU=9000 for jumbo frames) and every offload off, so each frame is
# what a NIC would send; bytes are the veth's frame counters, both directions (Ethernet, IP
# and UDP/TCP headers, acknowledgements, QUIC's packet protection included).
#
#   cargo build --release -p syncd
#   scripts/wire-bytes.sh [BIN_DIR] [N]       # N new 5 MB CARs per tool (3 by default)
#
# Each CAR is a stored ZIP of 20 random 250,000-byte entries (like bench-rsync's new CAR),
# written beside the folder and renamed into the manager's folder (syncd) or into lsyncd's
# source (lsyncd, delay 0, to an rsync daemon in the namespace), and pushed with `rsync -a` of the one file (what a
# script that knows what changed runs; a cron job's `rsync -a --delete` of the tree adds the
# file list on top). Needs root; installs rsync, lsyncd and ethtool if missing.
set -euo pipefail
BIN=$(realpath "${1:-$(dirname "$0")/../target/release}")
N=${2:-3}
MTU=${MTU:-1500}
NS=syncd-wire
W=$(mktemp -d /tmp/wire-bytes.XXXXXX)
HOST=10.201.0.1 PEER=10.201.0.2 PORT=17795 RPORT=8873

missing=()
for t in rsync:rsync lsyncd:lsyncd ethtool:ethtool; do
  command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cleanup() {
  pkill -f "config $W/" 2>/dev/null || true
  [ -n "${RSYNCD:-}" ] && kill "$RSYNCD" 2>/dev/null || true
  [ -n "${LSYNCD:-}" ] && kill "$LSYNCD" 2>/dev/null || true
  ip netns del $NS 2>/dev/null || true
  ip link del sw0 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns del $NS 2>/dev/null || true
ip link del sw0 2>/dev/null || true
ip netns add $NS
ip link add sw0 type veth peer name sw1
ip link set sw1 netns $NS
ip addr add $HOST/24 dev sw0
ip -n $NS addr add $PEER/24 dev sw1
ip link set sw0 mtu "$MTU" up
ip -n $NS link set sw1 mtu "$MTU" up
ip -n $NS link set lo up
offloads="tso off gso off gro off tx-udp-segmentation off"
# shellcheck disable=SC2086
ethtool -K sw0 $offloads >/dev/null
# shellcheck disable=SC2086
ip netns exec $NS ethtool -K sw1 $offloads >/dev/null

bytes() {
  local s=/sys/class/net/sw0/statistics
  echo $(($(cat $s/rx_bytes) + $(cat $s/tx_bytes)))
}
frames() {
  local s=/sys/class/net/sw0/statistics
  echo $(($(cat $s/rx_packets) + $(cat $s/tx_packets)))
}
# Until PATH has SIZE bytes (and a second more: the last acknowledgements).
arrived() {
  local t=0
  until [ "$(stat -c %s "$1" 2>/dev/null || echo 0)" = "$2" ]; do
    sleep 0.01
    t=$((t + 1))
    [ $t -lt 3000 ] || { echo "wire-bytes: $1 did not arrive in 30 s" >&2; exit 1; }
  done
  sleep 1
}

mkdir -p "$W"/mgr/server/carbonapps "$W"/w0 "$W"/lsrc/carbonapps "$W"/src/carbonapps \
  "$W"/rw/ls/carbonapps "$W"/rw/rs/carbonapps
mid=$("$BIN/syncd" init --state-dir "$W/mgr/state" 2>/dev/null)
aid=$("$BIN/syncd" init --state-dir "$W/w0/state" 2>/dev/null)
printf '[node]\nname = "mgr"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n[manager]\nlisten = "%s:%s"\n[[manager.agents]]\nname = "w0"\nid = "%s"\n[[folders]]\nname = "deployment"\npath = "server"\n' \
  $HOST $PORT "$aid" >"$W/mgr/syncd.toml"
printf '[node]\nname = "w0"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n[agent]\nmanager = "%s:%s"\nmanager_id = "%s"\n[[folders]]\nname = "deployment"\npath = "server"\n' \
  $HOST $PORT "$mid" >"$W/w0/syncd.toml"
(cd "$W/mgr" && exec "$BIN/syncd" manager --config "$W/mgr/syncd.toml" >/dev/null 2>"$W/mgr.log" &)
(cd "$W/w0" && exec ip netns exec $NS "$BIN/syncd" agent --config "$W/w0/syncd.toml" >/dev/null 2>"$W/w0.log" &)
printf 'uid = root\ngid = root\nuse chroot = no\n[ls]\npath = %s/rw/ls\nread only = false\n[rs]\npath = %s/rw/rs\nread only = false\n' \
  "$W" "$W" >"$W/rsyncd.conf"
ip netns exec $NS rsync --daemon --no-detach --address=$PEER --port=$RPORT --config="$W/rsyncd.conf" &
RSYNCD=$!
printf 'settings { nodaemon = true, logfile = "%s/lsyncd.log", statusFile = "%s/lsyncd.status" }\nsync { default.rsync, source = "%s/lsrc", target = "rsync://%s:%s/ls/", delay = 0 }\n' \
  "$W" "$W" "$W" $PEER $RPORT >"$W/lsyncd.conf"
sleep 0.5
lsyncd "$W/lsyncd.conf" >/dev/null 2>&1 &
LSYNCD=$!
sleep 2
"$BIN/syncctl" --socket "$W/mgr/admin.sock" wait --all --timeout 30s >/dev/null

echo "# veth MTU $MTU, offloads off; bytes = frames on the link, both directions"
echo
echo "| CAR | bytes | syncd | rsync (the file) | lsyncd (delay 0) | syncd ÷ best peer |"
echo "| --- | --- | --- | --- | --- | --- |"
for i in $(seq "$N"); do
  python3 - "$W/car.zip" "$i" <<'EOF'
import random, sys, zipfile
rng = random.Random(int(sys.argv[2]))
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_STORED) as z:
    for k in range(20):
        z.writestr(f"lib/x{k}.jar", rng.randbytes(250_000))
EOF
  size=$(stat -c %s "$W/car.zip")
  cp "$W/car.zip" "$W/src/carbonapps/new-$i.car"
  cp "$W/car.zip" "$W/lsyncd-next.car"
  sleep 1

  b0=$(bytes) f0=$(frames)
  mv "$W/car.zip" "$W/mgr/server/carbonapps/new-$i.car"
  arrived "$W/w0/server/carbonapps/new-$i.car" "$size"
  b1=$(bytes) f1=$(frames)
  cmp -s "$W/mgr/server/carbonapps/new-$i.car" "$W/w0/server/carbonapps/new-$i.car"

  rsync -a "$W/src/carbonapps/new-$i.car" "rsync://$PEER:$RPORT/rs/carbonapps/"
  sleep 1
  b2=$(bytes) f2=$(frames)
  cmp -s "$W/src/carbonapps/new-$i.car" "$W/rw/rs/carbonapps/new-$i.car"

  mv "$W/lsyncd-next.car" "$W/lsrc/carbonapps/new-$i.car"
  arrived "$W/rw/ls/carbonapps/new-$i.car" "$size"
  b3=$(bytes) f3=$(frames)
  cmp -s "$W/lsrc/carbonapps/new-$i.car" "$W/rw/ls/carbonapps/new-$i.car"

  s=$((b1 - b0)) r=$((b2 - b1)) l=$((b3 - b2))
  best=$((r < l ? r : l))
  printf '| %s | %s | %s (%s frames) | %s (%s frames) | %s (%s frames) | %s |\n' "$i" "$size" \
    "$s" $((f1 - f0)) "$r" $((f2 - f1)) "$l" $((f3 - f2)) \
    "$(python3 -c "print(f'{$s / $best:.3f}')")"
done
