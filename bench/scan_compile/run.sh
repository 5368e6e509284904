#!/bin/bash
# usage: run.sh NAME CONFIG [extra overrides...]; one compile, with CPU time and peak RSS.
cd "$(dirname "$0")/../.."
name=$1; cfg=$2; shift 2
out=${OUT:-bench/scan_compile}
{ echo "date: $(date -u)"; echo "load before: $(cat /proc/loadavg)";
  echo "cmd: plmjax compile --config $cfg --topology v5e-8 --config.mesh.fsdp=8 --config.mesh.data=1 $* --out $out/$name.json"; } > $out/$name.log
/usr/bin/time -f "time: user %U s  sys %S s  wall %e s  maxrss %M KB" \
  plmjax compile --config $cfg --topology v5e-8 --config.mesh.fsdp=8 --config.mesh.data=1 "$@" \
  --out $out/$name.json 2>&1 | grep -v "WARNING\|E0000\|Source Loc\|learning/\|^Failed" >> $out/$name.log
echo "load after: $(cat /proc/loadavg)" >> $out/$name.log
