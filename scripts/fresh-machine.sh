#!/usr/bin/env bash
# Clone to `import persona_gate` on a fresh machine, with the README's commands only.
#
# A fresh machine is made here: Debian bookworm by debootstrap (the project's machine kind runs Debian
# 12), with the packages that kind's image has that a build could touch (compiler, git, curl, CA
# certificates, CPython 3.11 with pip and venv) and the image's Rust toolchain (rustup's, mounted
# read-only: nothing can fetch another toolchain here, and the README says neither command installs
# Rust). No cargo registry, no pip cache, no models, no build: everything else the README's commands
# need, they must fetch themselves. Inside it, the script clones the repository and runs, as written in
# README.md, the first command of its opening block (models + build + the default-model chat) and the
# two commands of its "Python" section (`pip install ./python`, then `python -c "import persona_gate ..."`).
#
#   sudo bash scripts/fresh-machine.sh [ROOT]        (as root; ROOT default /var/tmp/pgate-fresh)
#
# Takes about 30 minutes on a 2-core machine (debootstrap and apt about 5, the release build about 15).
# Not part of scripts/test.sh: it needs root, mounts and a network to the package registries, and its
# run is the must-show of the Python issue (BENCHMARKS.md, "Fresh machine"). The log is ROOT/fresh.log.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
ROOT="${1:-/var/tmp/pgate-fresh}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="ca-certificates,git,curl,xz-utils,build-essential,python3,python3-pip,python3-venv,procps"
[ "$(id -u)" -eq 0 ] || { echo "fresh-machine: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
[ -d "$RUSTUP_HOME/toolchains" ] || { echo "fresh-machine: no rustup toolchain at $RUSTUP_HOME" >&2; exit 2; }

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { mkdir -p "$2"; mount --bind "$1" "$2"; mounted+=("$2"); [ "${3:-}" = ro ] && mount -o remount,bind,ro "$2"; return 0; }

if [ ! -x "$ROOT/usr/bin/git" ]; then
  echo "[fresh] debootstrap bookworm into $ROOT"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 ||
    { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
fi
# The machine's CA bundle and resolver (the registries are reached through them, as on every machine here).
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# A fresh home: no caches, no clone, no models, no venv from an earlier run of this script.
rm -rf "$ROOT/root" "$ROOT/opt/python" && mkdir -p "$ROOT/root/.cargo/bin"
cp -a "$CARGO_BIN/." "$ROOT/root/.cargo/bin/"
mount -t proc proc "$ROOT/proc" && mounted+=("$ROOT/proc")
bind /dev "$ROOT/dev"
bind "$RUSTUP_HOME" "$ROOT/root/.rustup" ro
bind "$REPO" "$ROOT/src/persona-gate" ro

# The README's own commands, taken from the file so that this runs what a reader would copy.
first=$(awk '/^```bash/{f=1;next} f&&/^```/{exit} f{print; exit}' README.md)
python_cmds=$(awk '/^## Python/{p=1} p&&/^```bash/{f=1;next} f&&/^```/{exit} f' README.md | sed 's/[[:space:]]\{2,\}#.*$//')
[ -n "$first" ] && [ -n "$python_cmds" ] || { echo "fresh-machine: README commands not found" >&2; exit 1; }
printf '%s\n' "$first" "$python_cmds" >"$ROOT/root/readme-commands.sh"
echo "[fresh] README commands:"; sed 's/^/    /' "$ROOT/root/readme-commands.sh"

cat >"$ROOT/root/run.sh" <<'EOF'
set -euo pipefail
# The machine's CPython 3.11 with pip (on the project's machines a pyenv build; here Debian's in a venv,
# since Debian marks its own interpreter as externally managed).
python3 -m venv /opt/python
export PATH="/opt/python/bin:$PATH"
cd /root && git clone -q /src/persona-gate persona-gate && cd persona-gate
git log --oneline -1
start=$(date +%s)
bash /root/readme-commands.sh
echo "[fresh] README commands done in $(( $(date +%s) - start )) s"
EOF
echo "[fresh] running in the chroot (log: $ROOT/fresh.log)"
chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb RUSTUP_AUTO_INSTALL=0 \
  PATH=/root/.cargo/bin:/usr/local/bin:/usr/bin:/bin \
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  /bin/bash /root/run.sh 2>&1 | tee "$ROOT/fresh.log"
