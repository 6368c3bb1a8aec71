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
