#!/bin/sh
# Install Debian's chromium for the browser tests (tests/test_demo.py) when it is missing.
# Never fails: where chromium cannot be installed, the browser tests skip and say why.
# (Playwright's own `playwright install` downloads a browser and does not work offline.)
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_chromium: no apt-get; browser tests will be skipped"; exit 0; }
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "install_chromium: not root and no sudo; browser tests will be skipped"; exit 0; fi
echo "install_chromium: apt-get install -y chromium (log: /tmp/install_chromium.log)"
export DEBIAN_FRONTEND=noninteractive
{ $SUDO apt-get install -y chromium || { $SUDO apt-get update && $SUDO apt-get install -y chromium; }; } \
  >/tmp/install_chromium.log 2>&1 || echo "install_chromium: failed (see the log); browser tests will be skipped"
exit 0
