//! NCCL between the CUDA shards of a tensor-parallel group: the row-parallel sums (two per layer) run
//! as `ncclAllReduce` in place on the device tensors, on the backend's stream, with no copy through the
//! host.
//!
//! Rank 0 makes the group's unique id ([`unique_id`]); the shard carries its 128 bytes to the other ranks
//! (over the socket the ranks already share) and every rank calls [`CudaBackend::attach_nccl`], which
//! returns once all of them have joined. cudarc loads `libnccl.so` at run time and panics if it is
//! missing, so everything here first checks [`nccl_present`] and reports its absence as an error.

use std::ffi::CStr;

use cudarc::nccl::{result as nccl_result, sys as nccl_sys};

use super::{CudaBackend, CudaTensor};
use crate::comm::Communicator;
use crate::error::{EngineError, Result};
use crate::weights::DType;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Whether the NCCL library (`libnccl.so`) can be opened. Never panics.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the library; no symbol is called.
    unsafe { nccl_sys::is_culib_present() }
}

fn missing() -> EngineError {
    EngineError::Backend(
        "the NCCL library (libnccl.so) is not installed or not on LD_LIBRARY_PATH; install NCCL, or use the \
         socket all-reduce (--comm socket)"
            .into(),
    )
}

fn nccl_err(what: &str, e: &nccl_result::NcclError) -> EngineError {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe {
        let p = nccl_sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    EngineError::Backend(format!("NCCL {what}: {:?} ({text})", e.0))
}

/// The NCCL version as NCCL encodes it (e.g. 22803 for 2.28.3).
pub fn version() -> Result<i32> {
    if !nccl_present() {
        return Err(missing());
    }
    nccl_result::get_nccl_version().map_err(|e| nccl_err("version", &e))
}

/// A fresh unique id for a new group (made by rank 0, given to every rank).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    if !nccl_present() {
        return Err(missing());
    }
    let id = nccl_result::get_uniqueid().map_err(|e| nccl_err("unique id", &e))?;
    #[allow(clippy::cast_sign_loss)]
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator.
pub(crate) struct NcclComm {
    comm: nccl_sys::ncclComm_t,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is only used through `&CudaBackend` by the engine, which runs one call at a
// time (the shard's engine lock), and NCCL communicators may be used from any thread.
unsafe impl Send for NcclComm {}
// SAFETY: as above; no NCCL call is made concurrently on one communicator.
unsafe impl Sync for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for the peers, which may be gone already.
        // SAFETY: `comm` came from ncclCommInitRank and is dropped once.
        let _ = unsafe { nccl_result::comm_abort(self.comm) };
    }
}

impl CudaBackend {
    /// Joins the NCCL group `id` as `rank` of `world` on this backend's device and stream; blocks until
    /// every rank has joined. From then on [`crate::Backend::all_reduce_sum`] runs on the device.
    pub fn attach_nccl(&mut self, id: &[u8; ID_BYTES], rank: usize, world: usize) -> Result<()> {
        if !nccl_present() {
            return Err(missing());
        }
        if rank >= world {
            return Err(EngineError::Backend(format!("NCCL rank {rank} of world {world}")));
        }
        let to_i32 = |v: usize| i32::try_from(v).map_err(|_| EngineError::Backend(format!("NCCL size {v}")));
        #[allow(clippy::cast_possible_wrap)]
        let uid = nccl_sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        self.ctx.bind_to_thread().map_err(|e| super::drv("bind context", e))?;
        let mut comm: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the id came from ncclGetUniqueId on rank 0; the context of this
        // backend's device is current on this thread, so NCCL uses that device.
        unsafe { nccl_result::comm_init_rank(&raw mut comm, to_i32(world)?, uid, to_i32(rank)?) }
            .map_err(|e| nccl_err(&format!("init of rank {rank} of {world}"), &e))?;
        self.nccl = Some(NcclComm { comm, rank, world });
        tracing::info!(rank, world, version = version().unwrap_or(0), "NCCL group joined");
        Ok(())
    }

    /// Whether tensor-parallel sums run over NCCL on the device.
    pub fn has_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    /// `t` summed over the NCCL group, in place, on the backend's stream. `comm` must describe the
    /// same group (its rank and size are checked).
    pub(crate) fn nccl_all_reduce(&self, nccl: &NcclComm, t: &mut CudaTensor, comm: &dyn Communicator) -> Result<()> {
        if comm.rank() != nccl.rank || comm.world_size() != nccl.world {
            return Err(EngineError::Backend(format!(
                "all-reduce over rank {} of {} but NCCL joined as rank {} of {}",
                comm.rank(),
                comm.world_size(),
                nccl.rank,
                nccl.world
            )));
        }
        self.check_dtype_bytes(t)?;
        let n = t.numel();
        if n == 0 {
            return Ok(());
        }
        let dt = match self.dtype {
            DType::BF16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            DType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
            DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        };
        let p = self.ptr(&t.buf);
        self.ctx.bind_to_thread().map_err(|e| super::drv("bind context", e))?;
        // SAFETY: `p` holds `n` elements of `dt` (checked above); in-place all-reduce is allowed; the
        // stream is this backend's, so the sum is ordered after the kernels that wrote `t` and before
        // those that read it.
        unsafe {
            nccl_result::all_reduce(
                p as *const ::core::ffi::c_void,
                p as *mut ::core::ffi::c_void,
                n,
                dt,
                nccl_sys::ncclRedOp_t::ncclSum,
                nccl.comm,
                self.stream.cu_stream() as nccl_sys::cudaStream_t,
            )
        }
        .map_err(|e| nccl_err("all-reduce", &e))?;
        self.after_launch("ncclAllReduce")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_nccl_is_an_error_not_a_panic() {
        if nccl_present() {
            return;
        }
        let e = unique_id().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("libnccl.so"), "{e}");
        assert!(version().is_err());
    }
}
