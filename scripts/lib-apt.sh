# shellcheck shell=bash
# Shared apt helpers for scripts/setup.sh and tests/vm/run-in-vm.sh. Source it; it defines
# functions only and changes nothing by itself.
#
# The one rule that matters: keep every QEMU package on ONE version. Debian 12 machines used by
# this project carry qemu-utils (qemu-img, qemu-storage-daemon 10.x) from bookworm-backports.
# `apt-get install qemu-system-x86` from the release suite would pull QEMU 7.2 and silently
# REMOVE qemu-utils 10 / qemu-storage-daemon. So QEMU packages come from the suite qemu-utils
# came from, and every install is simulated first and refused if it would remove a package.

LIBAPT_UPDATED=${LIBAPT_UPDATED:-0}

# apt_update_once: `apt-get update` at most once per process.
apt_update_once() {
  [ "$LIBAPT_UPDATED" = 1 ] && return 0
  echo "lib-apt: apt-get update" >&2
  apt-get update -qq >/dev/null
  LIBAPT_UPDATED=1
}

# pkg_installed PKG: true when dpkg has PKG fully installed.
pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# missing_pkgs PKG...: print the packages of the list that are not installed.
missing_pkgs() {
  local p
  for p in "$@"; do pkg_installed "$p" || echo "$p"; done
}

# backports_suite: print "<codename>-backports" (e.g. bookworm-backports).
backports_suite() {
  (. /etc/os-release && echo "${VERSION_CODENAME}-backports")
}

# ensure_backports_source: add the backports suite beside the existing Debian source if absent.
ensure_backports_source() {
  local bp; bp=$(backports_suite)
  grep -rqsw -- "$bp" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # deb822: copy the first stanza (the main archive) with only the suite changed
    sed -n '1,/^$/p' /etc/apt/sources.list.d/debian.sources | sed "s/^Suites: .*/Suites: $bp/" \
      > /etc/apt/sources.list.d/backports.sources
  elif [ -f /etc/apt/sources.list ]; then
    # one-line format: reuse the URI of the first plain `deb` line
    local uri
    uri=$(awk '$1=="deb" && $2 !~ /^\[/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "deb $uri $bp main" > /etc/apt/sources.list.d/backports.list
  else
    echo "lib-apt: no apt source to derive $bp from" >&2; return 1
  fi
  echo "lib-apt: added apt source for $bp" >&2
  LIBAPT_UPDATED=0   # the new suite needs an update
}

# apt_safe_install [-t SUITE] PKG...: install the packages (no recommends) after an
# `apt-get -s` dry run; refuses (returns 1) if the dry run would remove any package.
apt_safe_install() {
  local args=("$@") sim removed
  [ ${#args[@]} -gt 0 ] || return 0
  apt_update_once
  sim=$(DEBIAN_FRONTEND=noninteractive apt-get -s install -y --no-install-recommends "${args[@]}" 2>&1) || {
    echo "$sim" >&2; echo "lib-apt: apt-get -s install ${args[*]} failed" >&2; return 1; }
  removed=$(printf '%s\n' "$sim" | sed -n 's/^Remv \([^ ]*\).*/\1/p' | tr '\n' ' ')
  if [ -n "$removed" ]; then
    echo "lib-apt: REFUSING 'apt-get install ${args[*]}': it would remove: $removed" >&2
    return 1
  fi
  echo "lib-apt: apt-get install ${args[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${args[@]}" >/dev/null
}

# install_qemu: qemu-system-x86 (and qemu-utils if absent) from the suite qemu-utils came from.
# qemu-utils from backports (a ~bpo version) or not installed -> the backports suite, and
# qemu-system-x86 pinned to qemu-utils' exact version when the archive still has it;
# qemu-utils from the release -> the release, so the versions still match.
install_qemu() {
  local want v p t=()
  mapfile -t want < <(missing_pkgs qemu-utils qemu-system-x86)
  [ ${#want[@]} -gt 0 ] || return 0
  v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  if [ -z "$v" ] || [[ "$v" == *bpo* ]]; then
    ensure_backports_source || return 1
    t=(-t "$(backports_suite)")
  fi
  if [ -n "$v" ]; then
    apt_update_once
    for p in "${!want[@]}"; do
      if apt-cache madison "${want[$p]}" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF -- "$v"; then
        want[$p]="${want[$p]}=$v"
      fi
    done
  fi
  apt_safe_install "${t[@]}" "${want[@]}"
}

# install_missing PKG...: install (from the default suite) only those not yet installed.
install_missing() {
  local want
  mapfile -t want < <(missing_pkgs "$@")
  [ ${#want[@]} -gt 0 ] || return 0
  apt_safe_install "${want[@]}"
}
