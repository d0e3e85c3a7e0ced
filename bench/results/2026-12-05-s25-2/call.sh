# Session 25 call 2, binaries of scripts/gpu/build.sh at bf162bd (the staging-buffer change),
# repacked into .gpu-bin-serve; run from the repository root by the device tool:
bin=.gpu-bin-serve; . scripts/gpu/env.sh; mkdir -p $OUT/r
(timeout 240 $bin/cuda_adapters --test-threads=1 --nocapture > $OUT/r/adapters.txt 2>&1; echo "rc $?" >> $OUT/r/adapters.txt)
(timeout 240 $bin/cuda_golden --test-threads=2 > $OUT/r/golden.txt 2>&1; echo "rc $?" >> $OUT/r/golden.txt)
