#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
# A signed flat apt repository (the "vendor" repository of an image build), and a key that does
# not sign it:
#   make-apt-repo.sh DIR
#     DIR/repo/         Packages, Release, InRelease (clear-signed), gpuvirt-probe_{1.0,2.0}.deb
#     DIR/repo-key.asc  the public key that signs it
#     DIR/wrong-key.asc a public key that does not
# gpuvirt-probe VERSION installs /usr/share/gpuvirt-probe/version, whose content is VERSION.
set -euo pipefail
dir=$1
mkdir -p "$dir/repo" "$dir/pkg"
export GNUPGHOME=$dir/gnupg
mkdir -p "$GNUPGHOME"
chmod 0700 "$GNUPGHOME"
gen() {  # gen UID: an ed25519 signing key without a passphrase
  gpg --batch --quiet --pinentry-mode loopback --passphrase '' \
    --quick-gen-key "$1" ed25519 sign never 2>/dev/null
}
gen "gpuvirt test repository <repo@gpuvirt.invalid>"
gen "gpuvirt wrong key <wrong@gpuvirt.invalid>"
gpg --batch --armor --export repo@gpuvirt.invalid >"$dir/repo-key.asc"
gpg --batch --armor --export wrong@gpuvirt.invalid >"$dir/wrong-key.asc"

for version in 1.0 2.0; do
  root=$dir/pkg/gpuvirt-probe-$version
  mkdir -p "$root/DEBIAN" "$root/usr/share/gpuvirt-probe"
  printf '%s\n' "$version" >"$root/usr/share/gpuvirt-probe/version"
  cat >"$root/DEBIAN/control" <<CONTROL
Package: gpuvirt-probe
Version: $version
Architecture: all
Maintainer: gpuvirt.kvm tests <tests@gpuvirt.invalid>
Description: a file that says which version of the vendor repository's package is installed
CONTROL
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$dir/repo/gpuvirt-probe_${version}_all.deb" >/dev/null
done

cd "$dir/repo"
dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages
{
  echo "Origin: gpuvirt-test"
  echo "Label: gpuvirt-test"
  echo "Date: $(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
  echo "SHA256:"
  printf ' %s %s Packages\n' "$(sha256sum Packages | cut -d' ' -f1)" "$(stat -c %s Packages)"
} >Release
gpg --batch --yes --pinentry-mode loopback --passphrase '' --local-user repo@gpuvirt.invalid \
  --clearsign -o InRelease Release
