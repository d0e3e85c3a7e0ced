#!/usr/bin/env bash
# Session 21 call 4 (b414372, call 3's binaries): where the missed targets' time goes after the session's
# changes: ncu kernel times of 2-layer eager steps p1000, b128 and b128-distinct (kernel_profile.sh), and
# the SM clock and power while 32-layer p1000 and b128 steps run back to back (nvidia-smi every 20 ms).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
LORAX_PROFILE_LAYERS=2 timeout 200 scripts/gpu/kernel_profile.sh $R/kp $bin p1000 b128 b128-distinct > $R/kp.txt 2>&1; echo "rc $?" >> $R/kp.txt; lap kernel-profile
for x in p1000 b128; do
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 20 > $R/clocks-$x.csv 2>&1 &
  smi=$!
  LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=40 LORAX_PROFILE_SCENARIO=$x timeout 120 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture > $R/steps-$x.txt 2>&1
  echo "rc $?" >> $R/steps-$x.txt
  kill $smi
  lap clocks-$x
done
tar -C $OUT -czf $OUT/all.tgz r
