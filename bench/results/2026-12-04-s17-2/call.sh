#!/usr/bin/env bash
# Session 17 call 2 (experiment commit: LORAX_CUDA_SKIP_KERNELS): 32-layer eager steps with named kernels
# not launched, to see what each kernel kind costs inside a step (results are wrong by design; timing only).
bin=.gpu-bin-serve
. scripts/gpu/call_prelude.sh
step() { # scenario label skip-list
  echo "== $1 $2" >> $R/steps32.txt
  LORAX_CUDA_SKIP_KERNELS="$3" LORAX_PROFILE_LAYERS=32 LORAX_PROFILE_STEPS=6 LORAX_PROFILE_SCENARIO=$1 timeout 150 $bin/cuda_graphs --ignored --exact decode_step_kernels_for_a_profiler --nocapture 2>&1 | grep -E "STEP|PROFILED|panick|rror" >> $R/steps32.txt
}
step b8 warm ""; lap warm
ROWS="rope_kv_write,silu_mul,add_rms_norm,rms_norm,add_assign"
for x in b128 b8 b1 b128-a8; do
  step $x none ""
  step $x rope rope_kv_write
  step $x silu silu_mul
  step $x norms add_rms_norm,rms_norm
  step $x rows $ROWS
  step $x attn paged_attention_128_4_tc,attn_reduce
  step $x sample sample_rows
  if [ $x = b128-a8 ]; then step $x lora bgmv_shrink_ix,bgmv_expand_ix; step $x lora+rows bgmv_shrink_ix,bgmv_expand_ix,$ROWS; fi
  step $x none-again ""
  lap $x
done
tar -C $OUT -czf $OUT/all.tgz r
