# Sourced by run.sh and tp.sh on the GPU machine, from the repository root, with $bin set to the folder
# scripts/gpu/build.sh made: unpacks bin.tgz (bin then names the unpacked folder) and sets the
# environment the binaries need there.
if [ -f "$bin/bin.tgz" ]; then
    unpacked=$(mktemp -d)
    tar -xf "$bin/bin.tgz" -C "$unpacked"  # gzip or xz (GNU tar detects which)
    bin=$unpacked
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LORAX_FIXTURES=$PWD/tests/fixtures
export LORAX_KERNEL_CACHE=${LORAX_KERNEL_CACHE:-/tmp/lorax-kernel-cache}
# Never NVLink multicast on the shared hosts (the device notes say why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
# cudarc opens libnccl.so (or .so.1 and a few others), not libnccl.so.2: when only a versioned library
# exists (the system's, or the nvidia-nccl Python package's), link it under that name.
if ! ldconfig -p 2>/dev/null | grep -qE 'libnccl\.so '; then
    so=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so* /usr/local/cuda/lib64/libnccl.so* 2>/dev/null | head -1)
    if [ -z "$so" ]; then
        d=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)
        [ -n "$d" ] && so=$(ls "$d"/lib/libnccl.so* 2>/dev/null | head -1)
    fi
    [ -z "$so" ] && so=$(find / -name 'libnccl.so*' -not -path '/proc/*' 2>/dev/null | head -1)
    if [ -n "$so" ]; then
        mkdir -p /tmp/lorax-nccl
        ln -sf "$so" /tmp/lorax-nccl/libnccl.so
        export LD_LIBRARY_PATH=/tmp/lorax-nccl:$LD_LIBRARY_PATH
    fi
    echo "libnccl: ${so:-not found}"
fi
