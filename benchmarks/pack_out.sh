#!/usr/bin/env bash
# Usage: bash benchmarks/pack_out.sh DIR
# The device tool brings back at most 8 files from $OUT (device README, Limits): pack every file under DIR
# except DIR/log.txt and DIR/pipeline.txt into DIR/files.tgz (unpack here with tar xzf), so nothing is left out.
set -e
d=${1:?DIR}
cd "$d"
list=$(find . -type f ! -path ./log.txt ! -path ./pipeline.txt ! -path ./files.tgz | sort)
[ -z "$list" ] && exit 0
tar czf /tmp/pack_out_$$.tgz $list
rm -f $list
find . -mindepth 1 -type d -empty -delete
mv /tmp/pack_out_$$.tgz files.tgz
