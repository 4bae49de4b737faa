#!/usr/bin/env bash
# Install a distill-swarm pupil node as a systemd service: a Raspberry Pi (64-bit Raspberry Pi
# OS) or any systemd Linux with Python 3.11+ and its venv module (Debian: python3-venv).
#
#   sudo deploy/pupil/install.sh --broker-url amqp://SERVER:5672/swarm --node-id pi-7 \
#       --user pi-7 --password-file /root/pi-7.password
#
# 1. creates the system user `distill-swarm` (no login, home = the state directory);
# 2. creates a virtualenv in /opt/distill-swarm/venv and installs only `distill-swarm[pupil]`
#    into it, from --source (a PyPI requirement, a source directory or a wheel file);
# 3. writes /etc/distill-swarm/pupil.env (mode 0600: it holds the node's broker password);
# 4. installs /etc/systemd/system/distill-swarm-pupil.service, enables and (re)starts it.
# Run it again to upgrade: without settings flags an existing pupil.env is kept as it is.
#
# Settings (required on the first install):
#   --broker-url URL       amqp://HOST:5672/VHOST or amqps://HOST:5671/VHOST, no credentials
#   --node-id ID           this node's id: letters, digits, . _ - (at most 63)
#   --user NAME            its RabbitMQ user (default: the node id)
#   --password PASS        its RabbitMQ password; better: --password-file FILE, or type it at
#   --password-file FILE     the prompt (neither then lands in the shell history)
#   --ollama-model NAME    the pupil's text model in Ollama (default: phi4-mini)
#   --embed-model NAME     the embedding model, the master's (default: mxbai-embed-large)
#   --ollama-url URL       the Ollama server (default: http://127.0.0.1:11434)
#   --env KEY=VALUE        any other setting, repeatable, e.g.
#                            --env DISTILL_SWARM__BROKER__TLS_CA_FILE=/etc/distill-swarm/ca.pem
# Installation:
#   --source SPEC          what to pip-install (default: distill-swarm, from PyPI); `[pupil]` is
#                            added, so give `distill-swarm==0.1.0`, /path/to/checkout or a .whl
#   --pip-args "ARGS"      extra pip install arguments (word-split), e.g. "--no-deps"
#   --python PYTHON        the interpreter the virtualenv is made from (default: python3)
#   --root DIR             install under DIR instead of / (a scratch root for tests or images):
#                            no user is created, nothing is chowned, systemctl is not run
#   --no-systemctl         do everything except `systemctl daemon-reload/enable/restart`
#
# torch: the pupil depends on torch==2.13.0 (the adapter). PyPI's wheels of that release are CUDA
# builds on x86_64 and on aarch64 (a 64-bit Pi) alike: with their nvidia-* and cuda-* wheels the
# virtualenv is about 5 GB (measured on arm64, docs/deployment.md). They run on the CPU without a
# GPU. This script installs only from the package index pip is configured with; for a CPU build,
# pass a CPU wheel of torch 2.13.0 that you trust, e.g.
# --pip-args /path/to/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl (`2.13.0+cpu` satisfies
# the project's pin, so pip installs that file instead of the CUDA build).
#
# Exit codes: 0 installed, 1 a step failed, 2 bad arguments.
set -euo pipefail

SERVICE=distill-swarm-pupil.service
SERVICE_USER=distill-swarm
PREFIX=/opt/distill-swarm
VENV=$PREFIX/venv
CONF_DIR=/etc/distill-swarm
ENV_FILE=$CONF_DIR/pupil.env
STATE_DIR=/var/lib/distill-swarm
UNIT_DIR=/etc/systemd/system
NODE_ID_PATTERN='^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 2; }
fail() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

root="" systemctl=1 source_spec=distill-swarm pip_args="" python=python3
broker_url="" node_id="" broker_user="" password="" password_file=""
ollama_model=phi4-mini embed_model=mxbai-embed-large ollama_url=http://127.0.0.1:11434
extra_env=() settings_given=0

while [ $# -gt 0 ]; do
  arg=$1
  # --flag=value and --flag value are both accepted.
  if [[ $arg == --*=* ]]; then
    value=${arg#*=} arg=${arg%%=*} shift_by=1
  else
    value=${2-} shift_by=2
  fi
  case $arg in
    -h|--help) usage; exit 0 ;;
    --no-systemctl) systemctl=0 shift_by=1 ;;
    --broker-url) broker_url=$value settings_given=1 ;;
    --node-id) node_id=$value settings_given=1 ;;
    --user) broker_user=$value settings_given=1 ;;
    --password) password=$value settings_given=1 ;;
    --password-file) password_file=$value settings_given=1 ;;
    --ollama-model) ollama_model=$value settings_given=1 ;;
    --embed-model) embed_model=$value settings_given=1 ;;
    --ollama-url) ollama_url=$value settings_given=1 ;;
    --env) extra_env+=("$value") settings_given=1 ;;
    --source) source_spec=$value ;;
    --pip-args) pip_args=$value ;;
    --python) python=$value ;;
    --root) root=$value ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
  if [ "$shift_by" = 2 ] && [ $# -lt 2 ]; then die "$arg needs a value"; fi
  shift "$shift_by"
done

# -- checks before touching anything -------------------------------------------------------------

if [ -n "$root" ]; then
  [ -d "$root" ] || die "--root $root is not a directory"
  root=$(cd "$root" && pwd)
  systemctl=0
elif [ "$(id -u)" != 0 ]; then
  die "run as root (sudo), or give --root DIR to install into a scratch root"
fi
[ -f "$HERE/$SERVICE" ] || fail "$HERE/$SERVICE is missing: run the script from its directory"
command -v "$python" >/dev/null || die "no Python interpreter '$python' (give --python PATH)"
"$python" - <<'PY' || die "$python is not usable: install Python 3.11+ and its venv module (Debian, Raspberry Pi OS: apt-get install python3-venv)"
import sys
import ensurepip, venv  # noqa: F401  (Debian ships them in python3-venv)
sys.exit(sys.version_info < (3, 11))
PY

# A value pupil.env can hold literally: systemd parses quotes, backslashes and whitespace there.
PLAIN_VALUE='^[^[:space:]"'\''\\`$]+$'
plain() {
  [[ $2 =~ $PLAIN_VALUE ]] || die "$1 must not be empty or hold spaces, quotes, backslashes, \$ or \`"
}

if [ "$settings_given" = 1 ] || [ ! -f "$root$ENV_FILE" ]; then
  [ -n "$broker_url" ] || die "--broker-url is required (first install, or when changing settings)"
  [ -n "$node_id" ] || die "--node-id is required"
  [[ $node_id =~ $NODE_ID_PATTERN ]] || die "--node-id '$node_id': letters, digits, . _ - only, at most 63, starting with a letter or digit"
  broker_user=${broker_user:-$node_id}
  if [ -n "$password_file" ]; then
    [ -r "$password_file" ] || die "--password-file $password_file cannot be read"
    password=$(head -n 1 "$password_file")
  elif [ -z "$password" ] && [ -t 0 ]; then
    read -r -s -p "RabbitMQ password of $broker_user: " password
    echo
  fi
  [ -n "$password" ] || die "no password: give --password-file FILE (or --password)"
  for pair in "--ollama-model:$ollama_model" "--embed-model:$embed_model" "--ollama-url:$ollama_url"; do
    plain "${pair%%:*}" "${pair#*:}"
  done
  for pair in ${extra_env[@]+"${extra_env[@]}"}; do
    [[ $pair =~ ^[A-Z_][A-Z0-9_]*=.+$ ]] || die "--env '$pair': expected KEY=VALUE"
    plain "--env ${pair%%=*}" "${pair#*=}"
  done
  # The credentials go into the URL percent-encoded; pika decodes them. Passed through the
  # environment, not argv, so they never show up in `ps`.
  amqp_url=$(BROKER_URL=$broker_url BROKER_USER=$broker_user BROKER_PASSWORD=$password "$python" - <<'PY'
import os
import sys
import urllib.parse as up

url = up.urlsplit(os.environ["BROKER_URL"])
if url.scheme not in ("amqp", "amqps") or not url.hostname:
    sys.exit("--broker-url must look like amqp://HOST:5672/VHOST or amqps://HOST:5671/VHOST")
if url.username is not None or url.password is not None:
    sys.exit("--broker-url must not hold credentials: give --user and --password-file")
userinfo = ":".join(up.quote(os.environ[k], safe="") for k in ("BROKER_USER", "BROKER_PASSWORD"))
print(up.urlunsplit((url.scheme, f"{userinfo}@{url.netloc}", url.path, url.query, "")))
PY
  ) || die "bad --broker-url"
  plain --broker-url "$amqp_url"
  write_env=1
else
  write_env=0
fi

# -- 1. the service user -------------------------------------------------------------------------

if [ -z "$root" ]; then
  if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "distill-swarm pupil node" "$SERVICE_USER"
    say "created the system user $SERVICE_USER"
  fi
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
else
  say "--root: not creating the user $SERVICE_USER"
  install -d -m 0750 "$root$STATE_DIR"
fi

# -- 2. the virtualenv and the package -----------------------------------------------------------

case $(uname -m) in
  x86_64|amd64|aarch64|arm64)
    say "note: PyPI's torch==2.13.0 is a CUDA build on $(uname -m) (about 5 GB installed); see --help" ;;
esac
install -d -m 0755 "$root$PREFIX"
if [ ! -x "$root$VENV/bin/python" ]; then
  "$python" -m venv "$root$VENV" || fail "could not create the virtualenv $root$VENV"
fi
if [[ $source_spec == */* || $source_spec == *.whl ]]; then
  [ -e "$source_spec" ] || die "--source $source_spec does not exist"
  requirement="$(cd "$(dirname "$source_spec")" && pwd)/$(basename "$source_spec")[pupil]"
elif [[ $source_spec =~ ^([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$ ]]; then
  requirement="${BASH_REMATCH[1]}[pupil]${BASH_REMATCH[2]}"
else
  die "--source '$source_spec' is neither a path nor a requirement like distill-swarm==0.1.0"
fi
read -r -a extra_pip <<<"$pip_args"
say "installing $requirement into $root$VENV"
# --upgrade so that running the script again upgrades the project; pip's default strategy
# (only-if-needed) leaves dependencies such as torch alone while they satisfy the requirements.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$root$VENV/bin/python" -m pip install --quiet --upgrade \
  ${extra_pip[@]+"${extra_pip[@]}"} "$requirement" || fail "pip install $requirement failed"
[ -x "$root$VENV/bin/distill-swarm" ] || fail "$root$VENV/bin/distill-swarm was not installed"

# -- 3. the settings -----------------------------------------------------------------------------

install -d -m 0755 "$root$CONF_DIR"
if [ "$write_env" = 1 ]; then
  tmp=$(mktemp "$root$CONF_DIR/.pupil.env.XXXXXX")
  chmod 0600 "$tmp"
  {
    echo "# distill-swarm pupil node settings, written by install.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
    echo "# Mode 0600: the broker URL holds this node's password. Any setting can go here as"
    echo "# DISTILL_SWARM__SECTION__FIELD=value (docs/deployment.md); restart the service after"
    echo "# editing: systemctl restart $SERVICE"
    echo "AMQP_URL=$amqp_url"
    echo "DISTILL_SWARM__PUPIL__NODE_ID=$node_id"
    echo "DISTILL_SWARM__PUPIL__GENERATOR__KIND=ollama"
    echo "DISTILL_SWARM__PUPIL__GENERATOR__MODEL=$ollama_model"
    echo "DISTILL_SWARM__PUPIL__GENERATOR__URL=$ollama_url"
    echo "DISTILL_SWARM__PUPIL__EMBEDDER__KIND=ollama"
    echo "DISTILL_SWARM__PUPIL__EMBEDDER__MODEL=$embed_model"
    echo "DISTILL_SWARM__PUPIL__EMBEDDER__URL=$ollama_url"
    for pair in ${extra_env[@]+"${extra_env[@]}"}; do echo "$pair"; done
  } >"$tmp"
  mv -f "$tmp" "$root$ENV_FILE"
  say "wrote $root$ENV_FILE"
else
  say "keeping the settings in $root$ENV_FILE"
fi

# -- 4. the unit ---------------------------------------------------------------------------------

install -d -m 0755 "$root$UNIT_DIR"
install -m 0644 "$HERE/$SERVICE" "$root$UNIT_DIR/$SERVICE"
say "installed $root$UNIT_DIR/$SERVICE"
if [ "$systemctl" = 1 ]; then
  systemctl daemon-reload
  systemctl enable "$SERVICE"
  # restart, not start: an upgrade must replace the running process.
  systemctl restart "$SERVICE"
  say "started; check it with: systemctl status ${SERVICE%.service} && journalctl -u ${SERVICE%.service} -f"
else
  say "not running systemctl; to start: systemctl daemon-reload && systemctl enable --now $SERVICE"
fi
