#!/bin/sh
# Imports the broker's definitions: every *.json in DIRECTORY, in name order (init.sh's
# users, then the topology and permissions). The compose stack's one-shot `definitions`
# service runs it with the broker's own image once RabbitMQ is healthy, and the worker and
# producer start only if it succeeds: a definition RabbitMQ refuses stops the stack with
# RabbitMQ's reason, instead of a broker that passes its healthcheck without the users or
# queues (what 4.0.5's boot-time import does with definitions.skip_if_unchanged: it
# discards the import's result and records the new hash all the same).
#
# What was imported is recorded in the broker itself, next to the data it describes: the
# global parameter MARKER holds the files' SHA-256, set only after every file imported.
# Unchanged definitions are not imported again (so an operator's later changes stand);
# changed ones (new passwords, a new permission) are, and so is everything on a fresh
# broker, which has no MARKER.
#
# RabbitMQ seeds a fresh node with its default user (guest/guest, loopback only) unless it
# imported definitions at boot; DEFAULT_USER, when given, is removed after an import, so
# the only users are the definitions' own.
#
# Usage: import-definitions.sh DIRECTORY [MARKER [DEFAULT_USER]]
set -eu
directory=$1
marker=${2:-clusteralert_definitions_sha256}
default_user=${3:-}
set -- "$directory"/*.json
for file in "$@"; do
  [ -r "$file" ] || { echo "cannot read definitions at $file" >&2; exit 1; }
done
digest=$(cat "$@" | sha256sum | cut -d ' ' -f 1)

# rabbitmqctl reaches the node named by RABBITMQ_NODENAME with the Erlang cookie in $HOME.
parameters=$(rabbitmqctl -q list_global_parameters --no-table-headers)
tab=$(printf '\t')
imported=$(printf '%s\n' "$parameters" | sed -n "s/^$marker$tab\"\\(.*\\)\"\$/\\1/p")
if [ "$imported" = "$digest" ]; then
  echo "definitions unchanged since their import (sha256 $digest): nothing to do"
  exit 0
fi
for file in "$@"; do
  if ! rabbitmqctl -q import_definitions "$file"; then
    echo "RabbitMQ refused the definitions in $file (its reason is above);" \
      "nothing is recorded, so the next start tries again" >&2
    exit 1
  fi
done
if [ -n "$default_user" ] &&
  rabbitmqctl -q list_users --no-table-headers | cut -f 1 | grep -qxF "$default_user"; then
  rabbitmqctl -q delete_user "$default_user"
  echo "removed RabbitMQ's default user $default_user"
fi
rabbitmqctl -q set_global_parameter "$marker" "\"$digest\""
echo "definitions imported from $directory (sha256 $digest)"
