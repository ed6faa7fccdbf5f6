#!/bin/sh
# Logs a quorum change of a DRBD volume. Every DRBD value comes from the environment; quote it.
set -eu
case "$DRBD_NEW_QUORUM" in
  true) what="regained" ;;
  *) what="lost" ;;
esac
msg=$(printf '%s: quorum %s on %s volume %s (minor %s, disk %s)' \
  "$DRBD_NODE_NAME" "$what" "$DRBD_RES_NAME" "$DRBD_VOLUME" "$DRBD_MINOR" "$DRBD_NEW_DISK_STATE")
# Goes to the agent's log (stdout is captured there).
printf '%s\n' "$msg"
# Also to syslog when there is one in this container.
if command -v logger >/dev/null 2>&1; then
  logger -t "${QUORUM_LOG_TAG:-drbd}" -- "$msg" || true
fi
