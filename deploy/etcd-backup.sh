#!/usr/bin/env bash
# Full backup and restore of a Berth cluster's state: everything Berth keeps is in etcd
# (agents, secrets, tokens, the node deny list, cordons, placements, the replay queue with its
# bodies and answers), so an etcd snapshot is the whole of it. Needs etcdctl (Debian:
# etcd-client). See docs/backup.md for the procedure around it.
#
#   deploy/etcd-backup.sh save FILE [etcdctl flags: --endpoints URL --cacert --cert --key]
#       writes a consistent snapshot of the running etcd to FILE (readable by you only),
#       then checks it (its hash, revision, keys and size are printed).
#   deploy/etcd-backup.sh restore FILE DATA_DIR [etcdctl snapshot restore flags: --name
#       --initial-cluster --initial-advertise-peer-urls --initial-cluster-token]
#       makes a new etcd data directory from FILE (DATA_DIR must not exist); start the etcd
#       member on it with the same --name and peer URLs. For several members, restore the
#       same FILE once per member, each with its own --name and peer URL.
set -euo pipefail
export ETCDCTL_API=3
usage() { sed -n '2,16p' "$0" >&2; exit 2; }
command -v etcdctl >/dev/null || { echo "etcdctl is missing: apt-get install etcd-client" >&2; exit 1; }
[ $# -ge 2 ] || usage
action=$1 file=$2
shift 2
case "$action" in
  save)
    umask 077
    partial="$file.part"
    etcdctl "$@" snapshot save "$partial" >/dev/null
    etcdctl snapshot status "$partial" -w table
    mv "$partial" "$file"
    echo "snapshot saved to $file"
    ;;
  restore)
    [ $# -ge 1 ] || usage
    dir=$1
    shift
    [ -e "$dir" ] && { echo "$dir exists: restore into a new directory (move the old one aside)" >&2; exit 1; }
    etcdctl snapshot status "$file" -w table
    etcdctl snapshot restore "$file" --data-dir "$dir" "$@"
    echo "restored into $dir: start etcd on it with the same --name and peer URLs"
    ;;
  *) usage ;;
esac
