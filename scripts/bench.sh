#!/usr/bin/env bash
# The issue-7 benchmarks in one command: installs what they need (rsync, lsyncd, nftables, b3sum
# from Debian's packages), builds the release binaries, and runs one of them; every figure in
# BENCHMARKS.md came from one of these. Needs root (nftables counters, a daemon on 127.0.0.1).
#
#   scripts/bench.sh                       # bench-rsync --scale medium (about 17 minutes)
#   scripts/bench.sh rsync --scale large   # any bench-rsync options after "rsync"
#   scripts/bench.sh chunking | quic | memory | latency   [options of that bench]
#   scripts/bench.sh wire [N]              # bytes of new CARs on a 1500-MTU veth link (wire-bytes.sh)
#
# Run nothing else meanwhile: the machine's two cores are shared by every process of a run.
set -euo pipefail
cd "$(dirname "$0")/.."

which=${1:-rsync}
[ $# -gt 0 ] && shift
case "$which" in
  rsync) tools=(rsync lsyncd nft) packages=(rsync lsyncd nftables) ;;
  latency) tools=(rsync lsyncd) packages=(rsync lsyncd) ;;
  chunking) tools=(b3sum) packages=(b3sum) ;;
  quic | memory) tools=() packages=() ;;
  wire) tools=(rsync lsyncd ethtool) packages=(rsync lsyncd ethtool) ;;
  *) echo "unknown bench '$which': rsync, latency, chunking, quic, memory or wire" >&2; exit 2 ;;
esac

missing=()
for i in "${!tools[@]}"; do
  command -v "${tools[$i]}" >/dev/null || missing+=("${packages[$i]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== release build"
cargo build --release --locked -p syncd -p syncd-devtools

if [ "$which" = wire ]; then
  echo "== scripts/wire-bytes.sh target/release $*"
  exec scripts/wire-bytes.sh target/release "$@"
fi
echo "== bench-$which $*"
free -m | sed -n 2p | awk '{print "# memory: " $3 " MB used, " $7 " MB available"}'
df -h / | awk 'NR == 2 {print "# root filesystem: " $4 " free"}'
exec "target/release/bench-$which" "$@"
