# Shared by scripts/run, scripts/test and .ci/run (sourced, not run): the
# machine set-up every entry point needs before it builds anything.
#
# Build artefacts go to the checkout's own target/ unless CARGO_TARGET_DIR says
# otherwise. Not shared between checkouts on purpose: cargo names a workspace
# crate's artefacts the same in every checkout, and their freshness is judged
# by the sources of whichever checkout built them last, so a shared directory
# can run one checkout's tests on another checkout's code.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH=$CARGO_HOME/bin:$PATH

setup_say() { printf 'setup: %s\n' "$*" >&2; }

setup_machine() {
    command -v cargo >/dev/null || { setup_say "error: cargo not found; install Rust (rustup) first"; return 1; }
    # Build tools for the crates that compile C: gcc, make, perl and pkg-config
    # (librdkafka, bundled), cmake (zlib-ng under pingora's compression).
    local missing=()
    command -v cc >/dev/null || missing+=(gcc)
    command -v make >/dev/null || missing+=(make)
    command -v perl >/dev/null || missing+=(perl)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v g++ >/dev/null || missing+=(g++)
    command -v python3 >/dev/null || missing+=(python3)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then
        setup_say "installing Debian packages: ${missing[*]}"
        local sudo=()
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Background processes of a script, stopped together (`children_stop`, set as
# the script's exit trap). `child_start LOGDIR NAME COMMAND...` logs to
# LOGDIR/NAME.log; `child_ready LOGDIR NAME URL [TRIES]` waits (0.2 s a try)
# until the URL answers, else prints the log's tail and fails.
CHILDREN=()
child_start() {
    local dir=$1 name=$2
    shift 2
    "$@" >"$dir/$name.log" 2>&1 &
    CHILDREN+=($!)
}
child_ready() {
    local dir=$1 name=$2 url=$3 tries=${4:-150}
    for _ in $(seq 1 "$tries"); do
        if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    setup_say "$name did not become ready; last lines of $dir/$name.log:"
    tail -n 20 "$dir/$name.log" >&2
    return 1
}
children_stop() {
    for pid in "${CHILDREN[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${CHILDREN[@]}"; do wait "$pid" 2>/dev/null || true; done
    CHILDREN=()
}
