#!/bin/sh
# First-start setup for the compose stack, run once by the `init` service. It makes what
# must not live in the repository: random broker passwords (one per user), RabbitMQ's user
# definitions with salted hashes of them, and a private CA plus a certificate for the
# Mailpit relay, so that mail goes out over verified STARTTLS.
set -eu
umask 022
cd /secrets

password() {  # $1: file; keep an existing password so restarts do not lock users out
  [ -s "$1" ] || head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 > "$1"
}
# RabbitMQ's rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ password)).
# clusteralert strips one trailing newline from password files, so hash without it.
hash_password() {
  head -c 4 /dev/urandom > /tmp/salt
  { cat /tmp/salt; printf '%s' "$(cat "$1")"; } | openssl dgst -sha256 -binary > /tmp/digest
  cat /tmp/salt /tmp/digest | base64 | tr -d '\n'
  rm -f /tmp/salt /tmp/digest
}

password producer_amqp_password
password worker_amqp_password
password admin_amqp_password
password grafana_admin_password

# Definitions RabbitMQ imports at boot: these users (00-), then the topology and the
# least-privilege permissions from the repository (10-), which name these users.
# Hashes first, in assignments: set -e does not see failures inside a heredoc.
producer_hash=$(hash_password producer_amqp_password)
worker_hash=$(hash_password worker_amqp_password)
admin_hash=$(hash_password admin_amqp_password)
[ -n "$producer_hash" ] && [ -n "$worker_hash" ] && [ -n "$admin_hash" ]
mkdir -p /rabbitmq-definitions
cat > /rabbitmq-definitions/00-users.json <<JSON
{
  "users": [
    {"name": "clusteralert-producer", "password_hash": "$producer_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
    {"name": "clusteralert-worker", "password_hash": "$worker_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
    {"name": "admin", "password_hash": "$admin_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]}
  ],
  "vhosts": [{"name": "/"}],
  "permissions": [
    {"user": "admin", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
  ]
}
JSON
cp /deploy/rabbitmq/definitions.json /rabbitmq-definitions/10-topology.json

if [ ! -s smtp-ca.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=clusteralert dev CA" \
    -keyout smtp-ca-key.pem -out smtp-ca.pem
  openssl req -newkey rsa:2048 -nodes -subj "/CN=mailpit" -keyout smtp-key.pem -out smtp.csr
  printf 'subjectAltName=DNS:mailpit\nextendedKeyUsage=serverAuth\n' > smtp.ext
  openssl x509 -req -in smtp.csr -CA smtp-ca.pem -CAkey smtp-ca-key.pem -CAcreateserial \
    -days 825 -extfile smtp.ext -out smtp-cert.pem
  rm -f smtp.csr smtp.ext smtp-ca-key.pem smtp-ca.srl
fi
# Readable by the non-root clusteralert containers (uid 10001), Mailpit and RabbitMQ.
chmod 0644 ./*_password smtp-ca.pem smtp-cert.pem smtp-key.pem /rabbitmq-definitions/*
echo "secrets and definitions ready"
