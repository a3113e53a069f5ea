#!/usr/bin/env bash
# Generate everything a TLS + SuperNode-authenticated Flower 1.41 deployment needs.
#
#   docker/certs.sh OUT_DIR [NUM_SUPERNODES] [EXTRA_SAN ...]
#
#   OUT_DIR          where the files go (created; existing files are kept, so the
#                    script is safe to re-run and only adds what is missing, e.g.
#                    keys for more SuperNodes)
#   NUM_SUPERNODES   SuperNode key pairs to create (default 3): supernode-1 .. supernode-N
#   EXTRA_SAN        more subjectAltName entries for the SuperLink certificate, e.g.
#                    IP:192.0.2.10 DNS:fl.example.org (the addresses SuperNodes and the
#                    `flwr` CLI use to reach the SuperLink)
#
# Files (the layout e3sfc_launch/deploy.py and docker-compose.yml expect):
#   ca.crt, ca.key          self-signed CA (EC P-384); ca.crt goes to every SuperNode,
#                           SuperExec and CLI user, ca.key stays here
#   server.pem, server.key  SuperLink certificate signed by the CA, SANs
#                           DNS:superlink, DNS:localhost, IP:127.0.0.1 + EXTRA_SAN
#   supernode-I, supernode-I.pub
#                           SuperNode authentication key pair (ECDSA P-384, OpenSSH
#                           format, `ssh-keygen -t ecdsa -b 384`); register the .pub with
#                           `flwr supernode register supernode-I.pub <connection>`
#   superexec.secret        SuperExec authentication secret shared by the SuperLink and the
#                           SuperExec that runs ServerApps (process isolation)
#   supernode-I.secret      the same for SuperNode I and its ClientApp SuperExec (one per
#                           node, so no site holds a secret that another trusts)
#
# Env: CERT_DAYS (default 365); CERT_OWNER=UID:GID chowns the directory afterwards
# (the Flower images run as UID 49999: CERT_OWNER=49999:49999, as root).
# Needs: openssl (>= 1.1.1), ssh-keygen.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
num=${2:-3}
shift $(($# >= 2 ? 2 : 1))
if ! [[ "$num" =~ ^[0-9]+$ ]]; then
    echo "certs.sh: NUM_SUPERNODES must be a number, got '$num'" >&2
    exit 2
fi
days=${CERT_DAYS:-365}
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "certs.sh: '$tool' is required" >&2; exit 3; }
done

sans="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for san in "$@"; do
    sans="$sans,$san"
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

if [[ ! -f ca.crt || ! -f ca.key ]]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
        -keyout ca.key -out ca.crt -days "$days" -subj "/CN=E-3SFC Flower CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    rm -f server.pem server.key  # a new CA invalidates the old server certificate
fi

if [[ ! -f server.pem || ! -f server.key ]]; then
    ext=$(mktemp)
    trap 'rm -f "$ext" server.csr' EXIT
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid,issuer" \
        "subjectAltName=$sans" >"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
        -keyout server.key -out server.csr -subj "/CN=superlink" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha384 \
        -days "$days" -extfile "$ext" -out server.pem 2>/dev/null
    rm -f server.csr ca.srl
fi

for ((i = 1; i <= num; i++)); do
    if [[ ! -f "supernode-$i" ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "e3sfc-supernode-$i" -f "supernode-$i"
    fi
    if [[ ! -f "supernode-$i.secret" ]]; then
        openssl rand -hex 32 | tr -d '\n' >"supernode-$i.secret"
    fi
done

if [[ ! -f superexec.secret ]]; then
    openssl rand -hex 32 | tr -d '\n' >superexec.secret
fi

# Public material is world-readable; keys and the secret stay 0600.
chmod 644 ca.crt server.pem ./*.pub 2>/dev/null || true
if [[ -n "${CERT_OWNER:-}" ]]; then
    chown -R "$CERT_OWNER" .
fi
echo "certs.sh: CA, SuperLink certificate (SAN $sans) and $num SuperNode key pair(s) in $(pwd)"
