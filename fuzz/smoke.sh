#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (CI), or longer on purpose:
#   fuzz/smoke.sh            # 20 s per target
#   FUZZ_SECONDS=600 fuzz/smoke.sh
# Needs the nightly toolchain (cargo fuzz uses sanitizers) and installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-20}
if ! rustup toolchain list | grep -q nightly; then
  echo "fuzz: no nightly toolchain here; skipping (cargo fuzz needs it)"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --quiet
fi
for target in frames update paths chunks; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${SECONDS_PER_TARGET}s"
  log=$(mktemp)
  if ! cargo +nightly fuzz run "$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -rss_limit_mb=1024 -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $target failed (crash, leak or build error); artifacts in fuzz/artifacts/$target"
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" | tr '\n' ' '; echo
  rm -f "$log"
done
