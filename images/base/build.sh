#!/usr/bin/env bash
# Build the Python base image from Debian packages, for machines that cannot
# pull from a registry: debootstrap a minimal Debian with python3 into a
# folder, add the unprivileged "plugin" user (uid 65532), and `docker import`
# it. The package mirror is read from this machine's apt sources. Does
# nothing when the tag exists already; loads the image into Podman too when
# Podman answers and lacks it.
#
# Usage: images/base/build.sh            (tag: $BASE_IMAGE, default blackhole/base:bookworm)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib.sh
. "$here/../../scripts/lib.sh"

image=${BASE_IMAGE:-blackhole/base:bookworm}
suite=${BASE_SUITE:-bookworm}

mirror() {
  # The first deb source that serves "$suite": deb822 files first, then sources.list.
  local file uri
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    uri=$(awk -v suite="$suite" '
      /^URIs:/ {uris=$2}
      /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == suite) found=1}
      /^$/ {if (found && uris) {print uris; done=1; exit} found=0; uris=""}
      END {if (!done && found && uris) print uris}' "$file")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$file" ] || continue
    uri=$(awk -v suite="$suite" '$1 == "deb" && $0 ~ " " suite " " {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$file")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  return 1
}

if docker image inspect "$image" >/dev/null 2>&1; then
  bh_log "$image exists"
else
  bh_can_install || bh_die "$image is missing and building it needs Debian and root (debootstrap). Build it on such a machine, or set BASE_IMAGE to an image with python3 (e.g. python:3.11-slim-bookworm) that you can pull."
  command -v debootstrap >/dev/null 2>&1 || {
    bh_log "apt-get install debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
  }
  url=$(mirror) || bh_die "no apt source for '$suite' in /etc/apt/sources.list*; set BASE_SUITE or add a deb source"
  root=$(mktemp -d "${TMPDIR:-/tmp}/blackhole-base.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  bh_log "debootstrap $suite (python3) into $root"
  debootstrap --variant=minbase --include=python3 "$suite" "$root" "$url" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    bh_die "debootstrap failed; full log in $root.log"
  }
  rm -f "$root.log"
  chroot "$root" groupadd --gid 65532 plugin
  chroot "$root" useradd -K UID_MAX=65533 --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin plugin
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
    "$root"/usr/share/man "$root"/usr/share/locale
  bh_log "docker import $image"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
fi

run_dir=$(bh_run_dir)
if [ -f "$run_dir/engines.env" ] && command -v podman >/dev/null 2>&1; then
  export CONTAINERS_CONF="$run_dir/containers.conf"
  if ! podman image exists "$image" 2>/dev/null; then
    bh_log "loading $image into podman"
    docker save "$image" | podman load --quiet >/dev/null
  fi
fi
