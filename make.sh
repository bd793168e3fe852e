#!/usr/bin/env bash
# The project's commands, runnable from any folder on a fresh Debian machine.
#
#   ./make.sh demo             run the demo (installs mailflow into .venv first)
#   ./make.sh test [ARGS...]   lint, type-check and run the tests; ARGS go to pytest
#   ./make.sh install          create .venv and install mailflow with its test tools
#   ./make.sh lint             ruff and mypy only
#   ./make.sh bench [ARGS...]  run benchmarks/run.py
#
# `test` needs Dovecot (the tests start a private IMAP server) and installs
# Debian's dovecot-imapd when it is missing; that needs root or sudo.
set -euo pipefail
SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
cd -- "$(dirname -- "$SELF")"

VENV=.venv
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'make.sh: %s\n' "$*" >&2; exit 1; }

usage() {  # usage EXIT_CODE
    sed -n '2,11s/^# \{0,1\}//p' "$SELF" >&2
    exit "$1"
}

# Run a command as root: directly, through sudo, or by telling the user to.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "this needs root; run it as root, then try again: $*"
    fi
}

APT_UPDATED=no
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "please install these packages yourself: $*"
    local command="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $*"
    if [[ $EUID -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
        die "root is needed to install $*; run as root: $command"
    fi
    say "installing $* (apt-get)"
    if [[ $APT_UPDATED == no ]]; then
        as_root apt-get update -qq
        APT_UPDATED=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Python 3.11+ with a working `venv` (Debian ships ensurepip separately, in python3-venv).
ensure_python() {
    if [[ -x $VENV/bin/python ]]; then
        return
    fi
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "mailflow needs Python 3.11 or newer; python3 is $(python3 --version 2>&1)"
}

# install EXTRAS: create .venv if needed and `pip install -e .[EXTRAS]`, unless
# the same pyproject.toml was already installed (with those extras or more).
install() {
    local extras=$1 hash spec=.
    ensure_python
    if [[ ! -x $VENV/bin/python ]]; then
        say "creating $VENV"
        if ! python3 -m venv "$VENV"; then  # e.g. Debian without python3-venv
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    hash=$(sha256sum pyproject.toml | cut -c1-16)
    if [[ -e $VENV/.installed-$hash-$extras || ($extras == base && -e $VENV/.installed-$hash-test) ]]; then
        return
    fi
    [[ $extras == base ]] || spec=".[$extras]"
    say "installing mailflow ($spec) into $VENV"
    "$VENV/bin/python" -m pip install -q -e "$spec"
    rm -f "$VENV"/.installed-*
    touch "$VENV/.installed-$hash-$extras"
}

ensure_dovecot() {
    if [[ -x /usr/sbin/dovecot ]] || command -v dovecot >/dev/null 2>&1; then
        return
    fi
    apt_install dovecot-imapd
}

source_dirs() {
    local dir
    for dir in mailflow tests benchmarks; do
        if [[ -d $dir ]]; then
            printf '%s\n' "$dir"
        fi
    done
}

FAILED=()
step() {  # step NAME COMMAND...: run it, remember a failure, carry on
    local name=$1
    shift
    say "$name"
    if ! "$@"; then
        FAILED+=("$name")
    fi
}

lint_steps() {
    local dirs
    mapfile -t dirs < <(source_dirs)
    step "ruff check" "$VENV/bin/ruff" check "${dirs[@]}"
    step "ruff format --check" "$VENV/bin/ruff" format --check "${dirs[@]}"
    step "mypy" "$VENV/bin/mypy"
}

finish() {
    if ((${#FAILED[@]})); then
        local joined
        joined=$(printf '%s, ' "${FAILED[@]}")
        printf 'make.sh: failed: %s\n' "${joined%, }" >&2
        exit 1
    fi
}

cmd_install() {
    install test
}

cmd_lint() {
    install test
    lint_steps
    finish
}

cmd_test() {
    ensure_dovecot
    install test
    lint_steps
    step "pytest" "$VENV/bin/pytest" -q "$@"
    finish
}

cmd_demo() {
    install base
    exec "$VENV/bin/mailflow" demo "$@"
}

cmd_bench() {
    [[ -f benchmarks/run.py ]] || die "there is no benchmarks/run.py yet"
    install test
    exec "$VENV/bin/python" benchmarks/run.py "$@"
}

(($#)) || usage 2
command=$1
shift
case $command in
    demo | test | install | lint | bench) "cmd_$command" "$@" ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
esac
