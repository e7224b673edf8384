#!/usr/bin/env bash
# CI job for the browser example: Debian's chromium (installed here when /usr/bin/chromium is
# missing; no browser download through npm), then the spec that builds the page, serves it on
# 127.0.0.1 and trains in headless Chromium (spec/browser/). Expects `npm ci` to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium
fi
/usr/bin/chromium --version 2>/dev/null || true
npm run test:browser
