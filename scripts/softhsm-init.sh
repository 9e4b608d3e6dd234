#!/usr/bin/env bash
# Make a throw-away SoftHSM2 token in DIR (for tests and trials of the pkcs11 KEK backend):
#   eval "$(scripts/softhsm-init.sh /tmp/hsm)"   # exports SOFTHSM2_CONF and FIELDGUARD_PKCS11_PIN
set -euo pipefail
dir=${1:?usage: softhsm-init.sh DIR [LABEL]}
label=${2:-fieldguard}
command -v softhsm2-util >/dev/null || { echo "softhsm2-util missing: scripts/setup-debian.sh softhsm2" >&2; exit 1; }
mkdir -p "$dir/tokens"
chmod 700 "$dir"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir" > "$dir/softhsm2.conf"
pin=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
so_pin=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf FIELDGUARD_PKCS11_PIN=$pin"
