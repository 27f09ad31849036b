#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests in deploy/k8s:
#   1. renders the base and every overlay with `kubectl kustomize`;
#   2. checks every rendered object against the Kubernetes OpenAPI schemas
#      (strict: unknown fields are errors) with kubernetes-validate, for the
#      oldest and the newest Kubernetes version it ships schemas for;
#   3. runs deploy/check_rendered.py: references between objects (ConfigMap,
#      Secret keys, Service/PDB/HPA selectors and targets), probes on
#      /health/live and /health/ready, non-root and read-only root
#      filesystem, requests and limits, terminationGracePeriodSeconds above
#      preStop + server.shutdown_grace_s, the config keys cluster mode needs.
# Exits non-zero on any error. No cluster and no network needed, except the
# package registries to install what is missing:
#   - kubectl: when absent, Debian's `kubernetes-client` (apt-get). That is
#     kubectl 1.20 with kustomize v2.0.3; the kustomizations are written for
#     it and for kustomize v5 alike.
#   - kubernetes-validate (PyPI, ships its schemas): when absent, pip installs
#     it into a venv at target/deploy-venv (reused by later runs).
# Overrides: KUBECTL=/path/to/kubectl, KUBERNETES_VALIDATE=/path/to/kubernetes-validate,
# K8S_VERSIONS="1.29.0 1.37.0".
# This is what CI runs: `bash deploy/validate.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

KV_PIN="kubernetes-validate==1.37.0"
VENV=target/deploy-venv
start=$(date +%s)
log() { printf '== %s\n' "$*"; }

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  log "installing $* with apt-get"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null
}

# --- kubectl ---
KUBECTL=${KUBECTL:-}
if [ -z "$KUBECTL" ]; then
  if ! command -v kubectl >/dev/null 2>&1; then
    apt_install kubernetes-client || { echo "validate: kubectl missing and apt-get could not install kubernetes-client" >&2; exit 1; }
  fi
  KUBECTL=kubectl
fi
log "kubectl: $("$KUBECTL" version --client 2>/dev/null | head -n 2 | tr '\n' ' ')"

# --- kubernetes-validate ---
KV=${KUBERNETES_VALIDATE:-}
if [ -z "$KV" ]; then
  if [ -x "$VENV/bin/kubernetes-validate" ]; then
    KV="$VENV/bin/kubernetes-validate"
  elif command -v kubernetes-validate >/dev/null 2>&1; then
    KV=$(command -v kubernetes-validate)
  else
    log "installing $KV_PIN into $VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv && python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "$KV_PIN" >/dev/null
    KV="$VENV/bin/kubernetes-validate"
  fi
fi
# The Python that runs kubernetes-validate has PyYAML: it runs our checks too.
PY=$(head -n 1 "$KV" | sed -n 's/^#! *//p' | cut -d' ' -f1)
if [ -z "$PY" ] || ! "$PY" -c 'import yaml, tomllib' >/dev/null 2>&1; then
  PY=python3
fi
"$PY" -c 'import yaml, tomllib' || { echo "validate: $PY lacks PyYAML or tomllib (Python 3.11+)" >&2; exit 1; }
log "kubernetes-validate $("$KV" --version)"

# Oldest and newest schema versions this kubernetes-validate ships.
if [ -z "${K8S_VERSIONS:-}" ]; then
  K8S_VERSIONS=$("$PY" - <<'EOF'
import importlib.resources, re
root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
found = sorted({tuple(map(int, m.groups())) for p in root.iterdir()
                if (m := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", p.name))})
print(" ".join(".".join(map(str, v)) for v in (found[0], found[-1])) if found else "")
EOF
  ) || K8S_VERSIONS=""
  [ -n "$K8S_VERSIONS" ] || K8S_VERSIONS=$("$KV" --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p')
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  file="$out/$name.yaml"
  log "render $dir"
  # kustomize v5 notes the deprecated `bases` and `patchesStrategicMerge` on
  # stderr (kept for kustomize v2.0.3): hide those notes, show anything else.
  if ! "$KUBECTL" kustomize "$dir" >"$file" 2>"$out/$name.err"; then
    cat "$out/$name.err" >&2
    echo "ERROR $dir: kubectl kustomize failed" >&2
    status=1
    continue
  fi
  grep -v '^# Warning: .*deprecated' "$out/$name.err" >&2 || true
  echo "   $(grep -c '^kind:' "$file") objects"
  for version in $K8S_VERSIONS; do
    log "schemas $name, Kubernetes $version (strict)"
    "$KV" --strict --quiet -k "$version" "$file" || status=1
  done
  log "checks $name"
  "$PY" deploy/check_rendered.py "$name" "$file" || status=1
done

if [ "$status" -ne 0 ]; then
  echo "deploy/validate.sh: FAILED ($(($(date +%s) - start)) s)" >&2
  exit 1
fi
echo "deploy/validate.sh: ok ($(($(date +%s) - start)) s)"
