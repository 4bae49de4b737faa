#!/usr/bin/env bash
# Remove what deploy/pupil/install.sh installed:
#
#   sudo deploy/pupil/uninstall.sh            # keeps the trained adapter and the user
#   sudo deploy/pupil/uninstall.sh --purge    # removes them too
#
# Stops and disables distill-swarm-pupil.service, then deletes the unit, the virtualenv
# (/opt/distill-swarm) and the settings (/etc/distill-swarm/pupil.env). The state directory
# (/var/lib/distill-swarm: adapter checkpoints, lesson journal, lesson memory) and the user
# `distill-swarm` stay, so a reinstall carries on where the node left off, unless --purge.
#
#   --purge          also delete the state directory and the user
#   --root DIR       uninstall from a scratch root made by install.sh --root DIR (no systemctl,
#                      no userdel)
#   --no-systemctl   do not run systemctl
set -euo pipefail

SERVICE=distill-swarm-pupil.service
SERVICE_USER=distill-swarm
PREFIX=/opt/distill-swarm
CONF_DIR=/etc/distill-swarm
ENV_FILE=$CONF_DIR/pupil.env
STATE_DIR=/var/lib/distill-swarm
UNIT_DIR=/etc/systemd/system

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "uninstall.sh: $*" >&2; exit 2; }
say() { echo "uninstall.sh: $*"; }

root="" systemctl=1 purge=0
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --purge) purge=1 ;;
    --no-systemctl) systemctl=0 ;;
    --root) [ $# -ge 2 ] || die "--root needs a value"; root=$2; shift ;;
    --root=*) root=${1#*=} ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

if [ -n "$root" ]; then
  [ -d "$root" ] || die "--root $root is not a directory"
  root=$(cd "$root" && pwd)
  systemctl=0
elif [ "$(id -u)" != 0 ]; then
  die "run as root (sudo), or give --root DIR"
fi

if [ "$systemctl" = 1 ] && [ -e "$UNIT_DIR/$SERVICE" ]; then
  # Stopping lets the node finish its lesson and say goodbye (TimeoutStopSec in the unit).
  systemctl disable --now "$SERVICE" || say "could not stop $SERVICE; removing it anyway"
fi
rm -f -- "$root$UNIT_DIR/$SERVICE"
if [ "$systemctl" = 1 ]; then systemctl daemon-reload; fi
rm -rf -- "$root$PREFIX"
rm -f -- "$root$ENV_FILE"
rmdir -- "$root$CONF_DIR" 2>/dev/null || true
say "removed the service, $root$PREFIX and $root$ENV_FILE"

if [ "$purge" = 1 ]; then
  rm -rf -- "$root$STATE_DIR"
  if [ -z "$root" ] && getent passwd "$SERVICE_USER" >/dev/null; then
    userdel "$SERVICE_USER"
  fi
  say "purged $root$STATE_DIR and the user $SERVICE_USER"
else
  say "kept $root$STATE_DIR (the trained adapter) and the user $SERVICE_USER; --purge deletes them"
fi
