#!/usr/bin/env bash
# Installs the Debian packages medclear's local stack and tests need, once.
# Idempotent: does nothing (and asks no registry) when every package is present.
set -euo pipefail
packages=(
  openjdk-17-jre-headless maven         # Apache Kafka's broker (from Maven Central: kafka/pom.xml)
  kcat                                  # a third-party Kafka client: the tests check the ACLs with it
  clickhouse-server clickhouse-client   # the analytical event store (18.16 on Debian 12)
  prometheus                            # scraping and alert rules (promtool)
  pcscd libpcsclite-dev vsmartcard-vpcd swig  # PC/SC stack + what pyscard builds with
  opensc                                # opensc-tool: a third-party PC/SC client in the tests
  chromium                              # headless: the operator console and recon report as seen
  fonts-wqy-zenhei                      # CJK glyphs for those pages (异常交易, 对账)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "medclear setup: installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
