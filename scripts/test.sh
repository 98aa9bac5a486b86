#!/usr/bin/env bash
# Runs airlock's whole test suite on a fresh machine: installs what the tests
# need, checks formatting and lints, then runs every test. `.ci/run` calls this.
#
# Tests that need a host feature this machine lacks fail under CI=true and
# skip with a printed reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" = 0 ]; then
    if command -v apt-get >/dev/null; then
        # What the tests run, inside sandboxes or around them: setpriv
        # (util-linux) for the rootless tests, script (bsdutils) for the pty
        # test, useradd (passwd), curl and python3 as clients inside
        # sandboxes, openssl and ca-certificates for the TLS tests.
        missing=()
        for pkg in util-linux bsdutils iproute2 passwd procps curl python3 openssl ca-certificates; do
            dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
        done
        if [ "${#missing[@]}" -gt 0 ]; then
            say "installing ${missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        fi
        # The pure-cgroup-v2 test boots a Debian kernel in QEMU (software
        # emulation) with a busybox initramfs: suite/cgroup_v2.rs. The
        # microVM tier (suite/microvm.rs) boots the same kernel under QEMU's
        # microvm machine (its firmware, qemu-system-data, and 9p come with
        # qemu-system-x86) with an initramfs airlock writes itself.
        vm_missing=()
        for pkg in qemu-system-x86 busybox-static linux-image-amd64 cpio; do
            dpkg -s "$pkg" >/dev/null 2>&1 || vm_missing+=("$pkg")
        done
        if [ "${#vm_missing[@]}" -gt 0 ]; then
            say "installing ${vm_missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${vm_missing[@]}"
        fi
        # Registry pulls (suite/image_registry.rs) run against Debian's
        # docker-registry started by the test, with images pushed by skopeo
        # and an htpasswd file written by htpasswd (apache2-utils); umoci
        # packs and unpacks OCI layouts for the image tests and benchmark.
        registry_missing=()
        for pkg in docker-registry skopeo umoci apache2-utils; do
            dpkg -s "$pkg" >/dev/null 2>&1 || registry_missing+=("$pkg")
        done
        if [ "${#registry_missing[@]}" -gt 0 ]; then
            say "installing ${registry_missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${registry_missing[@]}"
        fi
        # A container engine inside a microVM (suite/containers.rs): Debian's
        # docker.io (dockerd, containerd, runc), which the guest runs from the
        # host's /usr, and e2fsprogs, whose mkfs.ext4 formats its disk. The
        # host's own dockerd is never started (policy-rc.d refuses it in
        # containers; the tests neither start nor touch it).
        engine_missing=()
        for pkg in docker.io e2fsprogs; do
            dpkg -s "$pkg" >/dev/null 2>&1 || engine_missing+=("$pkg")
        done
        if [ "${#engine_missing[@]}" -gt 0 ]; then
            say "installing ${engine_missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${engine_missing[@]}"
        fi
        # The HTML report is checked in headless Chromium (suite/report.rs):
        # it must load with nothing on its console and show what it should.
        if ! dpkg -s chromium >/dev/null 2>&1; then
            say "installing chromium"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
        fi
    fi
    # The rootless tests run airlock as this ordinary user.
    if ! id airlock-test >/dev/null 2>&1; then
        say "creating user airlock-test for the rootless tests"
        useradd --create-home --shell /bin/sh airlock-test
    fi
fi

# Without them the registry tests fail loudly under CI=true; so does this.
for bin in docker-registry skopeo umoci htpasswd; do
    if ! command -v "$bin" >/dev/null; then
        if [ "${CI:-}" = true ]; then
            echo "$bin is missing (Debian: docker-registry, skopeo, umoci, apache2-utils)" >&2
            exit 1
        fi
        say "$bin is missing: the registry tests will skip"
    fi
done

# The API fuzz test (crates/cli/tests/suite/daemon_fuzz.rs) drives the
# daemon with schemathesis, from PyPI. PIP_BREAK_SYSTEM_PACKAGES lets pip
# install into a distribution's Python that is marked externally managed.
if ! command -v schemathesis >/dev/null; then
    say "installing schemathesis"
    if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
    fi
    # Without it the fuzz test fails loudly under CI=true; say why here too.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet schemathesis \
        || say "could not install schemathesis: the API fuzz test will fail"
    # pyenv (where the machine's Python comes from) needs its shims renewed.
    if command -v pyenv >/dev/null; then pyenv rehash || true; fi
    hash -r
fi

# Python clients the tests drive, each in a venv of its own under
# target/test-deps (pinned where the test speaks someone else's protocol).
# Without them those tests fail loudly under CI=true; so does this.
python_venv() {  # DIR IMPORT-CHECK PIP-ARGS...
    local dir=$1 check=$2
    shift 2
    if "$dir/bin/python" -c "$check" >/dev/null 2>&1; then
        return
    fi
    say "installing $* into $dir"
    if ! python3 -m venv --help >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # Debian's Python makes venvs only with python3-venv.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    rm -rf "$dir"
    if ! { python3 -m venv "$dir" && "$dir/bin/python" -m pip install --quiet "$@"; }; then
        if [ "${CI:-}" = true ]; then
            echo "could not set up $dir (pip install $*)" >&2
            exit 1
        fi
        say "could not set up $dir: the tests that need it will skip"
    fi
}

# The Python SDK's tests (suite/python_sdk.rs): pytest and mypy, the SDK editable.
python_venv target/test-deps/py-sdk 'import pytest, mypy, airlock' -e 'sdk/python[test]'
# The MCP tests (suite/mcp.rs): the official Python SDK, `mcp` from PyPI.
MCP_PY_VERSION=2.3.0
python_venv target/test-deps/py-mcp \
    "import importlib.metadata as m; assert m.version('mcp') == '$MCP_PY_VERSION'" "mcp==$MCP_PY_VERSION"
# The E2B API tests (suite/e2b.rs): E2B's own SDKs, unmodified and pinned,
# from their registries: Python `e2b` in a venv, JavaScript `e2b` (run on
# Node) under a prefix of its own.
E2B_PY_VERSION=2.64.0
E2B_JS_VERSION=2.51.0
python_venv target/test-deps/py-e2b \
    "import importlib.metadata as m; assert m.version('e2b') == '$E2B_PY_VERSION'" "e2b==$E2B_PY_VERSION"
if [ "$(node -p "require('./target/test-deps/node/node_modules/e2b/package.json').version" 2>/dev/null)" != "$E2B_JS_VERSION" ]; then
    say "installing JavaScript e2b $E2B_JS_VERSION into target/test-deps/node"
    if ! npm install --silent --prefix target/test-deps/node "e2b@$E2B_JS_VERSION"; then
        if [ "${CI:-}" = true ]; then
            echo "could not install JavaScript e2b $E2B_JS_VERSION (npm)" >&2
            exit 1
        fi
        say "could not install JavaScript e2b: the tests that need it will skip"
    fi
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say "format"
cargo fmt --all -- --check

say "lints"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "tests"
cargo test --workspace --quiet -- --test-threads "${AIRLOCK_TEST_THREADS:-2}"
