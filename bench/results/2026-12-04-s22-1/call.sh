#!/usr/bin/env bash
# Session 22 call 1 (9ae977c, bgmv_expand_ix walking column groups): the LoRA GPU tests with the automatic tiles
# per block and with 3; ncu per kernel (2-layer eager steps) of b128-distinct, b128-a8, b128-identical, and of
# b128-distinct at 1 tile a block; 32-layer eager steps of b128 and the three LoRA mixes, distinct at 1, 2 and 4
# tiles; run.sh's golden, graphs, adapters and e2e.
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
timeout 200 $bin/cuda_kernels lora --nocapture --test-threads 2 > $R/kernels-lora.txt 2>&1; echo "rc $?" >> $R/kernels-lora.txt; lap lora
LORAX_CUDA_LORA_EXPAND_TILES=3 timeout 100 $bin/cuda_kernels lora --nocapture --test-threads 2 > $R/kernels-lora-t3.txt 2>&1; echo "rc $?" >> $R/kernels-lora-t3.txt; lap lora-t3
LORAX_PROFILE_LAYERS=2 timeout 150 scripts/gpu/kernel_profile.sh $R/kp $bin b128-distinct b128-a8 b128-identical > $R/kp.txt 2>&1; lap kp
LORAX_CUDA_LORA_EXPAND_TILES=1 LORAX_PROFILE_LAYERS=2 timeout 60 scripts/gpu/kernel_profile.sh $R/kp1 $bin b128-distinct > $R/kp1.txt 2>&1; lap kp1
for x in b128 b128-identical b128-a8 b128-distinct; do profile_step $x auto; done
for t in 1 2 4; do profile_step b128-distinct t$t LORAX_CUDA_LORA_EXPAND_TILES=$t; done
profile_step b128-a8 t1 LORAX_CUDA_LORA_EXPAND_TILES=1
lap steps
RUN_SKIP="nvrtc kernels sampling bench chunked" timeout 120 scripts/gpu/run.sh $R/run $bin > $R/run.txt 2>&1; echo "rc $?" >> $R/run.txt; lap run
rm -f $R/kp*/ncu-*.csv
tar -C $OUT -czf $OUT/all.tgz r
