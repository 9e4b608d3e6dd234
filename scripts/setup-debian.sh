#!/usr/bin/env bash
# Installs the Debian packages named on the command line when their command is missing.
# Used by `make test` (softhsm2 for the PKCS#11 tests) and `make bench` (wrk, nginx).
set -euo pipefail
# a probe is a command, or a file (a path) the package installs
declare -A probe=([softhsm2]=softhsm2-util [wrk]=wrk [nginx-light]=nginx [nginx]=nginx
                  [fonts-dejavu-core]=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf)
missing=()
for pkg in "$@"; do
  cmd=${probe[$pkg]:-$pkg}
  if [[ $cmd == /* ]]; then [ -e "$cmd" ] || missing+=("$pkg"); continue; fi
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "installing Debian packages: ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
