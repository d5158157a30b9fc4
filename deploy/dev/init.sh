#!/bin/sh
# First-start setup for the compose demo, run once by the `init` service: a random broker
# password, and a private CA plus a certificate for the Mailpit relay, so that the demo
# delivers over verified STARTTLS without any secret stored in the repository.
set -eu
umask 022
cd /secrets
if [ ! -s amqp_password ]; then
  head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 > amqp_password
fi
# RabbitMQ reads conf.d; this volume replaces the image's own conf.d, so restate its
# listener defaults here.
mkdir -p /rabbitmq-conf
cat > /rabbitmq-conf/10-clusteralert.conf <<CONF
listeners.tcp.default = 5672
management.tcp.port = 15672
loopback_users.guest = true
default_user = clusteralert
default_pass = $(cat amqp_password)
CONF
chmod 0644 /rabbitmq-conf/10-clusteralert.conf
if [ ! -s smtp-ca.pem ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=clusteralert dev CA" \
    -keyout smtp-ca-key.pem -out smtp-ca.pem
  openssl req -newkey rsa:2048 -nodes -subj "/CN=mailpit" \
    -keyout smtp-key.pem -out smtp.csr
  printf 'subjectAltName=DNS:mailpit\nextendedKeyUsage=serverAuth\n' > smtp.ext
  openssl x509 -req -in smtp.csr -CA smtp-ca.pem -CAkey smtp-ca-key.pem -CAcreateserial \
    -days 825 -extfile smtp.ext -out smtp-cert.pem
  rm -f smtp.csr smtp.ext smtp-ca-key.pem smtp-ca.srl
fi
# Readable by the non-root worker (uid 10001) and by Mailpit.
chmod 0644 amqp_password smtp-ca.pem smtp-cert.pem smtp-key.pem
echo "dev secrets ready"
