# The manifest validator and the Kubernetes version deploy/ is checked against; sourced by
# scripts/setup.sh (installs it) and tests/deploy/validate.sh (runs it). Bump both together
# with the venv directory name, which carries the version so a bump installs afresh.
# shellcheck shell=bash
KV_VERSION=1.37.0
K8S_VERSION=1.31
KV_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/virtiod-kubernetes-validate-$KV_VERSION"
