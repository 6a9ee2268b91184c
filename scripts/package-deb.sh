#!/usr/bin/env bash
# Builds a Debian package of syncd (binaries, systemd units, sysusers/tmpfiles snippets, example
# configs, man pages, shell completions) into target/deb/, then checks its contents.
#
#   scripts/package-deb.sh                 # release build
#   PROFILE=dev scripts/package-deb.sh     # reuse a debug build (CI checks the packaging only)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" -p syncd --quiet
bin_dir=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=target/deb/syncd_${version}_${arch}
rm -rf "$root"
mkdir -p "$root/DEBIAN"

install -Dm755 "$bin_dir/syncd" "$root/usr/bin/syncd"
install -Dm755 "$bin_dir/syncctl" "$root/usr/bin/syncctl"
install -Dm644 systemd/syncd-manager.service "$root/lib/systemd/system/syncd-manager.service"
install -Dm644 systemd/syncd-agent.service "$root/lib/systemd/system/syncd-agent.service"
install -Dm644 systemd/syncd.sysusers "$root/usr/lib/sysusers.d/syncd.conf"
install -Dm644 systemd/syncd.tmpfiles "$root/usr/lib/tmpfiles.d/syncd.conf"
install -Dm644 examples/manager.toml "$root/usr/share/doc/syncd/examples/manager.toml"
install -Dm644 examples/agent.toml "$root/usr/share/doc/syncd/examples/agent.toml"
install -Dm644 README.md "$root/usr/share/doc/syncd/README.md"
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
Maintainer: syncd developers <syncd@localhost>
Section: admin
Priority: optional
Depends: libc6 (>= 2.36)
Homepage: https://localhost/syncd
Description: keeps the deployment folders of a WSO2 cluster identical
 syncd watches the deployment folders of a WSO2 manager node and pushes each complete
 artifact to every worker over QUIC (TLS 1.3, pinned identities), verified, staged and
 renamed into place atomically. Workers stay read-only; syncctl pauses, resumes, holds
 and waits for the update procedures of a cluster kept available.
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
