//! Spawning and supervising the shard and router processes.
//!
//! Each child runs in its own process group (so a terminal's Ctrl-C reaches only the launcher, which
//! then stops the children in order) and gets SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{model, Args};

/// What a child is to the deployment: the order of shutdown follows it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Shard,
    Router,
}

struct Proc {
    name: String,
    role: Role,
    child: Child,
}

impl Proc {
    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.id() {
            if let Ok(pid) = i32::try_from(pid) {
                // The child leads its own process group: signal the whole group.
                let _ = killpg(Pid::from_raw(pid), sig);
            }
        }
    }
}

/// A binary shipped next to the launcher (cargo puts them together), or else found on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `program` with `args`; `env` is added to the launcher's environment, without its `API_KEY`
/// (only the router gets the key, through `env`).
fn spawn(
    name: &str,
    role: Role,
    program: &Path,
    args: &[String],
    env: &[(&'static str, String)],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("API_KEY")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: pre_exec runs in the forked child before exec; prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    tracing::info!(pid = child.id(), "started {name}");
    Ok(Proc {
        name: name.to_string(),
        role,
        child,
    })
}

async fn shard_healthy(socket: &Path) -> bool {
    use lorax_proto::shard::v1::{shard_service_client::ShardServiceClient, HealthRequest};
    if !socket.exists() {
        return false;
    }
    let Ok(channel) = lorax_proto::uds::connect(socket.to_path_buf()).await else {
        return false;
    };
    ShardServiceClient::new(channel).health(HealthRequest {}).await.is_ok()
}

/// Wait for a termination signal.
async fn termination() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = term => "SIGTERM",
    }
}

/// Wait until any child exits; returns its index and status.
async fn any_exit(procs: &mut [Proc]) -> (usize, std::io::Result<std::process::ExitStatus>) {
    let (status, idx, _) = futures::future::select_all(procs.iter_mut().map(|p| Box::pin(p.child.wait()))).await;
    (idx, status)
}

/// Stop every child still running, the router before the shards: SIGTERM to the router, which finishes
/// its open requests (they need the shards) and exits; then SIGTERM to the shards. A child still running
/// at the end of the grace period gets SIGKILL; the shards get at least a second after their SIGTERM.
async fn shutdown(procs: &mut [Proc], grace: Duration) {
    let deadline = Instant::now() + grace;
    let (routers, shards): (Vec<&mut Proc>, Vec<&mut Proc>) = procs.iter_mut().partition(|p| p.role == Role::Router);
    stop(routers, deadline).await;
    stop(shards, deadline.max(Instant::now() + Duration::from_secs(1))).await;
}

/// SIGTERM to each of `procs`, then waits for each until `deadline`, and SIGKILL to those still running.
async fn stop(mut procs: Vec<&mut Proc>, deadline: Instant) {
    for p in &procs {
        p.signal(Signal::SIGTERM);
    }
    for p in &mut procs {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, p.child.wait()).await {
            Ok(_) => tracing::info!("{} stopped", p.name),
            Err(_) => {
                tracing::warn!("{} did not stop within the shutdown grace period; killing it", p.name);
                p.signal(Signal::SIGKILL);
                let _ = p.child.wait().await;
            }
        }
    }
}

/// Run the deployment until a signal or a child's death.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let uds_dir = match &args.shard_uds_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("lorax-{}", std::process::id())),
    };
    std::fs::create_dir_all(&uds_dir).with_context(|| format!("creating {}", uds_dir.display()))?;
    let embedded_root = args.embedded_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (id, rev) = (args.model_id.clone(), args.revision.clone());
    let weights = !args.load_format.trim().eq_ignore_ascii_case("dummy");
    let resolved = tokio::task::spawn_blocking(move || {
        model::resolve_with(id.as_deref(), rev.as_deref(), &embedded_root, weights)
    })
    .await
    .context("model resolution task failed")??;
    tracing::info!(model = %resolved.model_id, dir = %resolved.dir.display(), "model resolved");

    let prefix = uds_dir.join("shard");
    let prefix_s = prefix.display().to_string();
    let mut procs: Vec<Proc> = Vec::new();
    let result = start_and_watch(&args, &resolved, &prefix_s, &mut procs).await;
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    shutdown(&mut procs, Duration::from_secs(args.shutdown_grace_s)).await;
    if args.shard_uds_dir.is_none() {
        let _ = std::fs::remove_dir_all(&uds_dir);
    }
    Ok(code)
}

async fn start_and_watch(
    args: &Args,
    resolved: &model::ResolvedModel,
    prefix: &str,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<ExitCode> {
    let json = if args.json_output {
        vec!["--json-output".to_string()]
    } else {
        vec![]
    };
    for rank in 0..args.num_shard {
        let mut a = vec![
            format!("--model-dir={}", resolved.dir.display()),
            format!("--model-id={}", resolved.model_id),
            format!("--uds-prefix={prefix}"),
            format!("--rank={rank}"),
            format!("--world-size={}", args.num_shard),
            format!("--device={}", args.device),
            format!("--dtype={}", args.dtype),
            format!("--load-format={}", args.load_format),
            format!("--num-blocks={}", args.num_blocks),
            format!("--block-size={}", args.block_size),
        ];
        a.extend(args.adapters.shard_flags());
        if let Some(addr) = &args.master_addr {
            a.push(format!("--master-addr={addr}"));
            a.push(format!("--master-port={}", args.master_port));
        }
        a.extend(json.iter().cloned());
        procs.push(spawn(
            &format!("shard {rank}"),
            Role::Shard,
            &sibling("lorax-shard"),
            &a,
            &[],
        )?);
    }

    // Wait for every shard's Health, watching for deaths and signals meanwhile.
    let deadline = Instant::now() + Duration::from_secs(args.shard_startup_timeout_s);
    let sockets: Vec<PathBuf> = (0..args.num_shard)
        .map(|r| PathBuf::from(format!("{prefix}-{r}")))
        .collect();
    let mut ready = vec![false; sockets.len()];
    let sig = termination();
    tokio::pin!(sig);
    while ready.iter().any(|r| !r) {
        for (i, s) in sockets.iter().enumerate() {
            if !ready[i] && shard_healthy(s).await {
                tracing::info!("shard {i} is ready");
                ready[i] = true;
            }
        }
        if ready.iter().all(|r| *r) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "shards did not become healthy within {}s",
            args.shard_startup_timeout_s
        );
        tokio::select! {
            (i, status) = any_exit(procs) => {
                anyhow::bail!("{} exited during startup ({}); see its log above", procs[i].name, describe(status));
            }
            s = &mut sig => {
                tracing::info!("{s} received during startup; shutting down");
                return Ok(ExitCode::SUCCESS);
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }

    let mut a = vec![
        format!("--port={}", args.port),
        format!("--hostname={}", args.hostname),
        format!("--master-shard-uds-path={prefix}-0"),
        format!("--tokenizer-path={}", resolved.dir.display()),
        format!("--model-id={}", resolved.model_id),
    ];
    a.extend(args.limits.to_flags());
    a.extend(args.adapters.router_flags());
    let (auth_flags, auth_env) = args.auth.router_flags_and_env();
    a.extend(auth_flags);
    a.extend(args.router_http.to_flags());
    a.extend(json);
    procs.push(spawn("router", Role::Router, &sibling("lorax-router"), &a, &auth_env)?);

    tokio::select! {
        (i, status) = any_exit(procs) => {
            tracing::error!("{} exited unexpectedly ({}); shutting the deployment down", procs[i].name, describe(status));
            Ok(ExitCode::FAILURE)
        }
        s = &mut sig => {
            tracing::info!("{s} received; shutting down");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}
