#!/bin/sh
# Setup for the compose stack, run by the `init` service at every start (its image,
# deploy/init/Dockerfile, has openssl). It makes what must not live in the repository:
# random broker passwords (one per user), RabbitMQ's user definitions with salted hashes
# of them, and a private CA plus a certificate for the Mailpit relay, so that mail goes
# out over verified STARTTLS. Later starts keep all of it, and renew the certificate
# before it expires.
#
# Each service gets a secrets volume of its own, which no other service mounts, holding
# only what it uses, owned by the user its image runs as and readable by nobody else:
#   volume (mounted here at)  what                                       owner
#   /secrets/worker           worker_amqp_password, smtp-ca.pem          10001 (deploy/Dockerfile)
#   /secrets/producer         producer_amqp_password                     10001
#   /secrets/mailpit          smtp-cert.pem, smtp-key.pem                0 (Mailpit runs as root)
#   /secrets/grafana          grafana_admin_password                     472 (Grafana's image)
#   /secrets/alertmanager     smtp-ca.pem (to verify Mailpit)            65534 (Alertmanager's image)
#   /secrets/admin            admin_amqp_password, for the operator only root (no service mounts it)
#   /rabbitmq-definitions     users (salted hashes only) and topology    999 (RabbitMQ's image)
set -eu
umask 077  # nothing is readable by others, not even while it is being written
# INIT_ROOT: run against a directory tree that mirrors the container's mounts (tests).
root=${INIT_ROOT:-}
secrets=$root/secrets
definitions=$root/rabbitmq-definitions
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

quiet() {  # run a command, showing its error output only if it fails (openssl's chatter)
  "$@" 2>"$scratch/stderr" || { cat "$scratch/stderr" >&2; return 1; }
}
password() {  # $1: file; keep an existing password so restarts do not lock users out
  [ -s "$1" ] || head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 > "$1"
}
# RabbitMQ's rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ password)).
# clusteralert strips one trailing newline from password files, so hash without it.
salted_hash() {  # $1: password file, $2: salt file
  { cat "$2"; printf '%s' "$(cat "$1")"; } | openssl dgst -sha256 -binary > "$scratch/digest"
  cat "$2" "$scratch/digest" | base64 | tr -d '\n'
}
# The hash already in the definitions while it still matches the password, else a new
# one: unchanged passwords give byte-identical definitions, which the broker's import
# (deploy/rabbitmq/import-definitions.sh) then knows it has already imported.
hash_password() {  # $1: password file, $2: user name
  old=$(sed -n "s/.*\"name\": \"$2\", \"password_hash\": \"\([^\"]*\)\".*/\1/p" \
    "$definitions/00-users.json" 2>/dev/null || true)
  if [ -n "$old" ]; then
    printf '%s' "$old" | base64 -d 2>/dev/null | head -c 4 > "$scratch/salt" || true
    [ "$(salted_hash "$1" "$scratch/salt")" = "$old" ] && { printf '%s' "$old"; return; }
  fi
  head -c 4 /dev/urandom > "$scratch/salt"
  salted_hash "$1" "$scratch/salt"
}

password "$secrets/producer/producer_amqp_password"
password "$secrets/worker/worker_amqp_password"
password "$secrets/admin/admin_amqp_password"
password "$secrets/grafana/grafana_admin_password"

# Definitions the `definitions` service imports once RabbitMQ is up: these users (00-),
# then the topology and the least-privilege permissions from the repository (10-), which
# name these users.
# Hashes first, in assignments: set -e does not see failures inside a heredoc.
producer_hash=$(hash_password "$secrets/producer/producer_amqp_password" clusteralert-producer)
worker_hash=$(hash_password "$secrets/worker/worker_amqp_password" clusteralert-worker)
admin_hash=$(hash_password "$secrets/admin/admin_amqp_password" admin)
[ -n "$producer_hash" ] && [ -n "$worker_hash" ] && [ -n "$admin_hash" ]
cat > "$definitions/00-users.json" <<JSON
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
cp "$root/deploy/rabbitmq/definitions.json" "$definitions/10-topology.json"

# The relay's certificate and key go to Mailpit only, the CA certificate to the worker
# (and a copy to Alertmanager, below); the CA's key is thrown away once it has signed,
# so renewing makes a new CA too.
# Renewed when missing, within 30 days of expiry (init runs at every `up`), or when the
# chain fails the strict checks that Python 3.13's default verification applies
# (VERIFY_X509_STRICT: keyUsage on the CA, key identifiers): older stacks made such a CA.
# Mailpit, the worker and Alertmanager read them at start:
# `docker compose restart mailpit worker alertmanager`.
ca=$secrets/worker/smtp-ca.pem
cert=$secrets/mailpit/smtp-cert.pem
key=$secrets/mailpit/smtp-key.pem
relay_certificate_ok() {
  [ -s "$ca" ] && [ -s "$cert" ] && [ -s "$key" ] &&
    openssl x509 -checkend $((30 * 86400)) -noout -in "$cert" >/dev/null &&
    openssl verify -x509_strict -purpose sslserver -verify_hostname mailpit \
      -CAfile "$ca" "$cert" >/dev/null 2>&1 &&
    [ "$(openssl x509 -noout -pubkey -in "$cert")" = "$(openssl pkey -pubout -in "$key")" ]
}
if ! relay_certificate_ok; then
  cd "$scratch"
  cat > ca.cnf <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = clusteralert dev CA
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
CNF
  cat > leaf.ext <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:mailpit
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EXT
  quiet openssl req -x509 -config ca.cnf -extensions ca -newkey rsa:2048 -nodes -days 3650 \
    -keyout smtp-ca-key.pem -out smtp-ca.pem
  quiet openssl req -new -config ca.cnf -newkey rsa:2048 -nodes -subj "/CN=mailpit" \
    -keyout smtp-key.pem -out smtp.csr
  quiet openssl x509 -req -in smtp.csr -CA smtp-ca.pem -CAkey smtp-ca-key.pem -CAcreateserial \
    -days 825 -extfile leaf.ext -out smtp-cert.pem
  rm -f "$ca" "$cert" "$key"  # 0400, and maybe another owner's: replace, do not write
  mv smtp-cert.pem "$cert"
  mv smtp-key.pem "$key"
  mv smtp-ca.pem "$ca"
  cd /
  relay_certificate_ok
  echo "relay certificate made, valid until $(openssl x509 -noout -enddate -in "$cert" | cut -d= -f2)"
fi

# Owner and modes on every start, so a volume from an older layout is fixed too.
own() {  # $1: uid, $2: directory (a volume's root)
  chown -R "$1:0" "$2"
  chmod 0700 "$2"
  find "$2" -mindepth 1 -type f -exec chmod 0400 {} +
}
# Alertmanager verifies Mailpit with the same CA, from its own volume.
rm -f "$secrets/alertmanager/smtp-ca.pem"
cp "$ca" "$secrets/alertmanager/smtp-ca.pem"
own 10001 "$secrets/worker"
own 10001 "$secrets/producer"
own 0 "$secrets/mailpit"
own 472 "$secrets/grafana"
own 65534 "$secrets/alertmanager"
own 0 "$secrets/admin"
own 999 "$definitions"
echo "secrets and definitions ready"
