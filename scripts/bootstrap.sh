#!/usr/bin/env bash
# Installs what diana-star needs on a fresh Debian/Ubuntu machine, idempotently:
# system packages (dcmtk, Java 17, Maven), a virtualenv in .venv with the project,
# and the local stack's Kafka and OpenSearch from Maven Central (cached in ~/.cache/diana-star).
#   scripts/bootstrap.sh [--test]      --test also installs the test requirements
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v openssl >/dev/null || need+=(openssl)
# Orthanc: a real archive peer for the benchmark (bench/), exercised by the test suite's smoke run.
[[ -n "$extras" ]] && { [[ -x /usr/sbin/Orthanc ]] || need+=(orthanc); }
# Orthanc's DICOMweb plugin: a DICOMweb client of diana serve in tests/integration/test_dicomweb.py
[[ -n "$extras" ]] && { [[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need+=(orthanc-dicomweb); }
# headless Chromium renders the HTML report in tests/test_dashboards_report.py
[[ -n "$extras" ]] && { [[ -x /usr/bin/chromium ]] || need+=(chromium); }
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || {
    echo "diana-star needs Python 3.11 or newer as python3" >&2; exit 1; }
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if ((${#need[@]})); then
    echo "==> installing system packages: ${need[*]}"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install ${need[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> installing diana-star${extras} into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"

echo "==> fetching the local stack (Kafka, OpenSearch) if not cached"
.venv/bin/diana stack install
