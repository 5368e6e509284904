#!/bin/bash
cd "$(dirname "$0")/../.."
out=${OUT:-bench/scan_compile}; name=gpt2_medium_tp4_scan
{ echo "date: $(date -u)"; echo "load before: $(cat /proc/loadavg)";
  echo "cmd: plmjax compile --config configs/gpt2_medium.py --topology v5e-8 --config.mesh.tensor=4 --config.mesh.data=2 --config.train.batch_size=32 --config.model.scan_layers=true --out $out/$name.json"; } > $out/$name.log
/usr/bin/time -f "time: user %U s  sys %S s  wall %e s  maxrss %M KB" \
  plmjax compile --config configs/gpt2_medium.py --topology v5e-8 --config.mesh.tensor=4 --config.mesh.data=2 --config.train.batch_size=32 --config.model.scan_layers=true --out $out/$name.json 2>&1 | grep -v "WARNING\|E0000\|Source Loc\|learning/\|^Failed" >> $out/$name.log
echo "load after: $(cat /proc/loadavg)" >> $out/$name.log
