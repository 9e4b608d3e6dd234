#!/usr/bin/env bash
# Installs the npm packages the tests need (json-server, a CRM nobody here wrote), exactly as locked.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v npm >/dev/null || { echo "npm is required (Node.js 18+): apt-get install nodejs npm" >&2; exit 1; }
npm ci --no-audit --no-fund --loglevel=error
