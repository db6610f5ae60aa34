#!/usr/bin/env bash
# Validate every manifest under deploy/ against the Kubernetes API schemas of K8S_VERSION
# (tests/deploy/versions.sh), strictly: an unknown field, a wrong type, a missing required
# field or a kind without a schema fails. First a self-test: a manifest with an unknown
# field and one of an unknown kind must be rejected, so a validator that lets everything
# through cannot pass unnoticed.
#
# usage: tests/deploy/validate.sh          # scripts/setup.sh installs the validator
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/deploy/versions.sh
. "$here/versions.sh"
deploy="$here/../../deploy"
kv="$KV_VENV/bin/kubernetes-validate"
py="$KV_VENV/bin/python"
[ -x "$kv" ] || { echo "validate: no $kv: run scripts/setup.sh (installs kubernetes-validate $KV_VERSION)" >&2; exit 1; }

# Custom resources kubernetes-validate has no schema for, checked by crd_check below: the kind
# and the fields its CRD (external-snapshotter v8, snapshot.storage.k8s.io/v1) allows.
CRD_KINDS="VolumeSnapshotClass"

# crd_check FILE: every document of FILE of a kind in CRD_KINDS has the required fields and no
# other top-level field; exit 1 with the reason otherwise.
crd_check() {
  "$py" - "$1" <<'PY'
import sys, yaml
allowed = {"VolumeSnapshotClass": ({"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"},
                                   {"apiVersion", "kind", "metadata", "driver", "deletionPolicy"})}
ok = True
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") not in allowed:
        continue
    known, required = allowed[doc["kind"]]
    extra, missing = set(doc) - known, required - set(doc)
    if doc["apiVersion"] != "snapshot.storage.k8s.io/v1" or extra or missing \
            or doc["deletionPolicy"] not in ("Delete", "Retain") or not doc["metadata"].get("name"):
        print(f"ERROR {sys.argv[1]}: {doc['kind']}: unknown fields {sorted(extra)}, missing {sorted(missing)}, "
              f"or a wrong apiVersion/deletionPolicy/name")
        ok = False
sys.exit(0 if ok else 1)
PY
}

# check FILE: 0 when every document of FILE validates; prints the validator's complaints.
check() {
  local out rc=0
  out=$("$kv" --strict --kubernetes-version "$K8S_VERSION" --quiet "$1" 2>&1) || rc=$?
  [ -z "$out" ] || echo "$out"
  [ "$rc" = 0 ] || return 1
  # "Couldn't find schema for kind K": only the custom resources listed above may say so.
  local kind
  for kind in $(echo "$out" | sed -n "s/.*Couldn't find schema for kind \([A-Za-z]*\).*/\1/p"); do
    case " $CRD_KINDS " in
      *" $kind "*) ;;
      *) echo "ERROR $1: kind $kind has no schema in Kubernetes $K8S_VERSION" >&2; return 1 ;;
    esac
  done
  crd_check "$1"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/unknown-field.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: csi.virtiod.io
spec:
  attachRequired: false
  attachRequried: true
YAML
cat >"$tmp/unknown-kind.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: CSIDrivers
metadata:
  name: csi.virtiod.io
YAML
cat >"$tmp/crd-unknown-field.yaml" <<'YAML'
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: x
driver: csi.virtiod.io
deletionPolicy: Delete
parameter: {}
YAML
for bad in "$tmp"/*.yaml; do
  if check "$bad" >/dev/null 2>&1; then
    echo "validate: self-test failed: $(basename "$bad") was accepted; the check is broken" >&2
    exit 1
  fi
done
echo "validate: self-test ok (an unknown field, an unknown kind and a bad custom resource are rejected)"

n=0 failed=0
for f in "$deploy"/*.yaml; do
  n=$((n + 1))
  check "$f" || { failed=$((failed + 1)); echo "validate: $f: FAILED" >&2; }
done
[ "$n" -gt 0 ] || { echo "validate: no manifests under $deploy" >&2; exit 1; }
if [ "$failed" != 0 ]; then
  echo "validate: $failed of $n manifests failed against Kubernetes $K8S_VERSION" >&2
  exit 1
fi
echo "validate: $n manifests valid against Kubernetes $K8S_VERSION (kubernetes-validate $KV_VERSION, strict)"
