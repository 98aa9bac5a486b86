#!/usr/bin/env bash
# Runs every airlock benchmark on a fresh machine, in one command:
#
#   bench/run.sh [harness options]      e.g. bench/run.sh --iterations 100
#
# 1. As root, installs the peers it compares against (bubblewrap, runc, socat,
#    skopeo, umoci), curl (the egress benchmarks' client), QEMU (the microVM
#    tier's engine), docker-registry (the images section's local registry)
#    and docker.io (the containers section's engine, run inside the guests:
#    the host's own dockerd is never used) with apt-get when they are missing, and a kernel for the microVM guest
#    (linux-image-amd64) when /boot has none.
#    One that cannot be installed is reported and its rows are skipped; the
#    rest still runs.
# 2. Installs E2B's Python SDK, pinned, into a venv of its own
#    ($CARGO_TARGET_DIR/bench-deps/py-e2b) for the e2b section; without it
#    that section is skipped.
# 3. Builds airlock and the harness in release mode.
# 4. Runs the harness (bench/src) against that airlock binary. Options after
#    run.sh are passed to it; `bench/run.sh --help` lists them.
#
# Scratch files go to $CARGO_TARGET_DIR/bench-work (default target/bench-work),
# which airlock needs to be o+x all the way up; see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '== %s\n' "$*" >&2; }
warn() { printf '!! %s\n' "$*" >&2; }

# command -> Debian package: the peers, and curl for the egress benchmarks
# (tinyproxy is compared against where installed, but not installed here: its
# package starts a system proxy service.)
declare -A PEERS=([bwrap]=bubblewrap [runc]=runc [curl]=curl [socat]=socat
    [qemu-system-x86_64]=qemu-system-x86 [skopeo]=skopeo [umoci]=umoci [docker-registry]=docker-registry
    [busybox]=busybox-static [dockerd]=docker.io)
# what is lost without it
declare -A USED_BY=([bwrap]="benchmarks against bwrap" [runc]="benchmarks against runc" [curl]="egress benchmarks"
    [socat]="egress rows through a bare relay" [qemu-system-x86_64]="microvm benchmarks"
    [skopeo]="image pulls from the local registry" [umoci]="image pull peers"
    [docker-registry]="image pulls from the local registry" [busybox]="image benchmarks"
    [dockerd]="containers benchmarks")

missing=()
for cmd in "${!PEERS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done

# The microVM guest boots the distribution's kernel (with its modules).
kernel_missing=
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
    kernel_missing=1
fi

wanted=("${missing[@]}")
[ -n "$kernel_missing" ] && wanted+=("linux-image-amd64")
if [ "${#wanted[@]}" -gt 0 ]; then
    missing=("${wanted[@]}")
    if [ "$(id -u)" != 0 ]; then
        warn "not root: cannot install ${missing[*]}; what needs them is skipped"
    elif ! command -v apt-get >/dev/null 2>&1; then
        warn "no apt-get on this machine: cannot install ${missing[*]}; what needs them is skipped"
    else
        say "installing: ${missing[*]}"
        if ! apt-get update -qq; then
            warn "apt-get update failed; trying to install from the existing package lists"
        fi
        if [ -n "$kernel_missing" ]; then
            if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-image-amd64 \
                >/dev/null; then
                say "installed linux-image-amd64 (the microVM guest's kernel)"
            else
                warn "could not install linux-image-amd64: microvm benchmarks are skipped"
            fi
        fi
        for cmd in "${missing[@]}"; do
            [ "$cmd" = linux-image-amd64 ] && continue
            pkg="${PEERS[$cmd]}"
            if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null \
                && command -v "$cmd" >/dev/null 2>&1; then
                say "installed $pkg"
            else
                warn "could not install $pkg: ${USED_BY[$cmd]} are skipped"
            fi
        done
    fi
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The e2b section drives the daemon with E2B's own Python SDK, unmodified
# and pinned (the version scripts/test.sh tests against), from PyPI.
E2B_PY_VERSION=2.64.0
E2B_VENV="$CARGO_TARGET_DIR/bench-deps/py-e2b"
if ! "$E2B_VENV/bin/python" -c \
    "import importlib.metadata as m; assert m.version('e2b') == '$E2B_PY_VERSION'" >/dev/null 2>&1; then
    say "installing e2b==$E2B_PY_VERSION into $E2B_VENV"
    if ! python3 -m venv --help >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # Debian's Python makes venvs only with python3-venv.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null || true
    fi
    rm -rf "$E2B_VENV"
    if ! { python3 -m venv "$E2B_VENV" && "$E2B_VENV/bin/python" -m pip install --quiet "e2b==$E2B_PY_VERSION"; }; then
        warn "could not install e2b==$E2B_PY_VERSION: the e2b section is skipped"
    fi
fi

say "building airlock (release)"
cargo build --release -p airlock
say "building the harness (release)"
cargo build --release -p airlock-bench

say "running the benchmarks"
exec "$CARGO_TARGET_DIR/release/airlock-bench" --airlock "$CARGO_TARGET_DIR/release/airlock" \
    --e2b-python "$E2B_VENV/bin/python" "$@"
