#!/usr/bin/env bash
# Builds a Debian package of syncd (binaries, systemd units, sysusers/tmpfiles snippets, example
# configs, man pages, shell completions) into target/deb/, then checks its contents, and with
# lintian installed, that lintian finds no error or warning.
#
#   scripts/package-deb.sh                 # release build
#   PROFILE=dev scripts/package-deb.sh     # reuse a debug build (CI checks the packaging only)
#   MAINTAINER="Ops <ops@example.com>" scripts/package-deb.sh   # who the package names
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" -p syncd --quiet
bin_dir=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
maintainer=${MAINTAINER:-syncd developers <syncd@example.org>}
# The changelog's date: the last commit's, so the same tree builds the same package.
date=$(git log -1 --format=%aD 2>/dev/null || date -R)
year=$(date -d "$date" +%Y)
root=target/deb/syncd_${version}_${arch}
rm -rf "$root"
mkdir -p "$root/DEBIAN"

# The release profile keeps debug info for profiling; the package ships the binaries stripped.
install -d "$root/usr/bin"
for bin in syncd syncctl; do
  strip --strip-unneeded -o "$root/usr/bin/$bin" "$bin_dir/$bin"
  chmod 755 "$root/usr/bin/$bin"
done
install -Dm644 systemd/syncd-manager.service "$root/lib/systemd/system/syncd-manager.service"
install -Dm644 systemd/syncd-agent.service "$root/lib/systemd/system/syncd-agent.service"
install -Dm644 systemd/syncd.sysusers "$root/usr/lib/sysusers.d/syncd.conf"
install -Dm644 systemd/syncd.tmpfiles "$root/usr/lib/tmpfiles.d/syncd.conf"
install -Dm644 examples/manager.toml "$root/usr/share/doc/syncd/examples/manager.toml"
install -Dm644 examples/agent.toml "$root/usr/share/doc/syncd/examples/agent.toml"
install -Dm644 README.md "$root/usr/share/doc/syncd/README.md"
cat > "$root/usr/share/doc/syncd/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: syncd

Files: *
Copyright: $year the syncd developers
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 644 "$root/usr/share/doc/syncd/copyright"
cat > "$root/usr/share/doc/syncd/changelog" <<CHANGELOG
syncd ($version) unstable; urgency=medium

  * Built from the syncd source tree; see README.md for what this version does.

 -- $maintainer  $date
CHANGELOG
gzip -9n "$root/usr/share/doc/syncd/changelog"
chmod 644 "$root/usr/share/doc/syncd/changelog.gz"
mkdir -p "$root/etc/syncd"

assets=$(mktemp -d)
"$bin_dir/syncd" generate-assets "$assets"
for page in syncd syncctl; do
  install -Dm644 "$assets/man/$page.1" "$root/usr/share/man/man1/$page.1"
  gzip -9n "$root/usr/share/man/man1/$page.1"
  install -Dm644 "$assets/completions/bash/$page" "$root/usr/share/bash-completion/completions/$page"
  install -Dm644 "$assets/completions/zsh/_$page" "$root/usr/share/zsh/vendor-completions/_$page"
  install -Dm644 "$assets/completions/fish/$page.fish" "$root/usr/share/fish/vendor_completions.d/$page.fish"
done
rm -rf "$assets"

cat > "$root/DEBIAN/control" <<CONTROL
Package: syncd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Section: admin
Priority: optional
Depends: libc6 (>= 2.36)
Description: keeps the deployment folders of a WSO2 cluster identical
 syncd watches the deployment folders of a WSO2 manager node and pushes each
 complete artifact to every worker over QUIC (TLS 1.3, pinned identities),
 verified, staged and renamed into place atomically. Workers stay read-only;
 syncctl pauses, resumes, holds and waits for the update procedures of a
 cluster kept available.
CONTROL
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  command -v systemd-sysusers >/dev/null && systemd-sysusers syncd.conf || true
  command -v systemd-tmpfiles >/dev/null && systemd-tmpfiles --create syncd.conf || true
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
  echo "syncd: write /etc/syncd/syncd.toml (see /usr/share/doc/syncd/examples or \`syncd config\`),"
  echo "       run \`syncd init --state-dir /var/lib/syncd\`, then enable syncd-manager or syncd-agent."
fi
POSTINST
chmod 755 "$root/DEBIAN/postinst"

deb=target/deb/syncd_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "built $deb"

# Check the package holds what an operator needs.
listing=$(dpkg-deb -c "$deb")
for want in ./usr/bin/syncd ./usr/bin/syncctl ./lib/systemd/system/syncd-manager.service \
  ./lib/systemd/system/syncd-agent.service ./usr/lib/sysusers.d/syncd.conf \
  ./usr/lib/tmpfiles.d/syncd.conf ./usr/share/man/man1/syncd.1.gz ./usr/share/man/man1/syncctl.1.gz \
  ./usr/share/bash-completion/completions/syncctl ./usr/share/doc/syncd/examples/agent.toml; do
  if ! grep -q " $want\$" <<<"$listing"; then
    echo "package check failed: $want missing"; exit 1
  fi
done
dpkg-deb -f "$deb" Package Version Architecture
echo "package contents checked"
if command -v lintian >/dev/null; then
  # As root lintian says it runs as root; that line is not about the package.
  if ! out=$(lintian --fail-on error,warning "$deb" 2>&1); then
    grep -v "running with root privileges" <<<"$out"
    echo "lintian found problems"
    exit 1
  fi
  echo "lintian: no errors or warnings"
else
  echo "lintian not installed: not checked (apt-get install lintian)"
fi
