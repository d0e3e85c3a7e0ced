//! Chat templates rendered in worker processes of bounded memory.
//!
//! A chat template is a program, and an adapter's comes from whoever published the adapter: any client may
//! name a hub adapter whose `tokenizer_config.json` holds a hostile one. minijinja's fuel bounds a
//! template's instructions and `chat.rs` caps its output, but one instruction can copy a value, so a list
//! doubled in a loop of 40 steps asks for terabytes: in the router's own process that ends the process,
//! and every client's requests with it. So the router renders in workers: `lorax-router
//! --chat-template-worker` processes that it starts on first use, each limited to
//! [`WORKER_MEMORY_BYTES`] of address space (`RLIMIT_AS`). A template that takes more stops its worker
//! (Rust aborts on the failed allocation); that request gets a 422 and the next render starts a new
//! worker. A render that takes longer than [`RENDER_TIMEOUT`] has its worker killed.
//!
//! The workers speak JSON lines over their standard input and output: a [`Job`] in, an [`Answer`] out. Each
//! keeps the templates it compiled (the same few come back). At most `--validation-workers` render at once.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

use crate::chat::{ChatError, ChatTemplate, Message};

/// The first argument that makes `lorax-router` a template worker (see `main.rs`).
pub const WORKER_FLAG: &str = "--chat-template-worker";

/// Address space of one worker: far more than any real template needs (a render's output is capped at 16
/// MiB), small enough that `--validation-workers` of them at their limit leave the host's memory alone.
pub const WORKER_MEMORY_BYTES: u64 = 256 << 20;

/// Longest render before its worker is killed. Fuel stops a template's loops well before this; it bounds
/// renders whose single instructions are slow (copies of large values).
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Compiled templates a worker keeps; it forgets them all when one more comes.
const WORKER_TEMPLATES: usize = 64;

/// One render, as sent to a worker.
#[derive(Serialize, Deserialize)]
struct Job<'a> {
    template: std::borrow::Cow<'a, str>,
    bos_token: std::borrow::Cow<'a, str>,
    eos_token: std::borrow::Cow<'a, str>,
    messages: std::borrow::Cow<'a, [Message]>,
    add_generation_prompt: bool,
}

/// A worker's answer: the prompt, or why the template could not render it.
#[derive(Serialize, Deserialize)]
enum Answer {
    Prompt(String),
    Error(ChatError),
}

/// The worker's side: limits its own address space, then renders each [`Job`] line of standard input to an
/// [`Answer`] line on standard output until standard input ends (the router closed it, or died).
pub fn worker_main() -> ExitCode {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::signal::{signal, SigHandler, Signal};
    if let Err(e) = setrlimit(Resource::RLIMIT_AS, WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES) {
        eprintln!("lorax-router {WORKER_FLAG}: cannot limit its memory: {e}");
        return ExitCode::FAILURE;
    }
    // The router's process group gets the launcher's (or a terminal's) SIGTERM and SIGINT: a worker leaves
    // when the router closes its input, so that the router's last requests can still render while it
    // drains.
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: ignoring a signal installs no handler code.
        if let Err(e) = unsafe { signal(sig, SigHandler::SigIgn) } {
            eprintln!("lorax-router {WORKER_FLAG}: cannot ignore {sig}: {e}");
        }
    }
    let mut compiled: HashMap<(String, String, String), ChatTemplate> = HashMap::new();
    let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
    let (mut input, mut output) = (stdin.lock(), stdout.lock());
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return ExitCode::SUCCESS,
            Ok(_) => {}
            Err(e) => {
                eprintln!("lorax-router {WORKER_FLAG}: reading a job: {e}");
                return ExitCode::FAILURE;
            }
        }
        let answer = match serde_json::from_str::<Job<'_>>(&line) {
            Ok(job) => render_job(&mut compiled, job),
            Err(e) => Answer::Error(ChatError::Render(format!("the renderer got a malformed job: {e}"))),
        };
        let written = serde_json::to_writer(&mut output, &answer)
            .map_err(std::io::Error::from)
            .and_then(|()| output.write_all(b"\n"))
            .and_then(|()| output.flush());
        if let Err(e) = written {
            eprintln!("lorax-router {WORKER_FLAG}: writing an answer: {e}");
            return ExitCode::FAILURE;
        }
    }
}

fn render_job(compiled: &mut HashMap<(String, String, String), ChatTemplate>, job: Job<'_>) -> Answer {
    let key = (
        job.template.into_owned(),
        job.bos_token.into_owned(),
        job.eos_token.into_owned(),
    );
    if !compiled.contains_key(&key) {
        if compiled.len() >= WORKER_TEMPLATES {
            compiled.clear();
        }
        match ChatTemplate::new(&key.0, &key.1, &key.2) {
            Ok(template) => {
                compiled.insert(key.clone(), template);
            }
            Err(e) => return Answer::Error(e),
        }
    }
    match compiled
        .get(&key)
        .map(|t| t.apply(&job.messages, job.add_generation_prompt))
    {
        Some(Ok(prompt)) => Answer::Prompt(prompt),
        Some(Err(e)) => Answer::Error(e),
        None => Answer::Error(ChatError::Render("the renderer lost the template".into())),
    }
}

/// Where templates are rendered.
#[derive(Clone, Debug, Default)]
pub enum Renderer {
    /// In the router's process, on a blocking thread: for templates the operator trusts (tests, embedding).
    #[default]
    InProcess,
    /// In worker processes of bounded memory (what `lorax-router` runs).
    Workers(Arc<WorkerPool>),
}

impl Renderer {
    /// Workers started from `exe` (a `lorax-router` binary), at most `parallel` rendering at once.
    pub fn workers(exe: PathBuf, parallel: usize) -> Self {
        Self::Workers(Arc::new(WorkerPool {
            exe,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(parallel.max(1)),
        }))
    }

    /// `messages` rendered with `template`; `add_generation_prompt` opens the assistant's turn.
    ///
    /// # Errors
    /// The template's own error, or that its render took too much memory or time.
    pub async fn render(
        &self,
        template: &ChatTemplate,
        messages: Vec<Message>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        match self {
            Self::InProcess => {
                let template = template.clone();
                tokio::task::spawn_blocking(move || template.apply(&messages, add_generation_prompt))
                    .await
                    .map_err(|e| ChatError::Render(format!("rendering the chat template failed: {e}")))?
            }
            Self::Workers(pool) => pool.render(template, &messages, add_generation_prompt).await,
        }
    }
}

/// Worker processes, started on demand and kept while they answer.
#[derive(Debug)]
pub struct WorkerPool {
    exe: PathBuf,
    idle: Mutex<Vec<Worker>>,
    slots: Semaphore,
}

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// How one exchange with a worker went wrong.
enum Failure {
    /// Its pipes broke: it stopped.
    Stopped,
    /// It answered something that is not an [`Answer`].
    Garbled(String),
}

impl WorkerPool {
    async fn render(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ChatError::Render("the chat template renderers are shut down".into()))?;
        let (bos_token, eos_token) = template.special_tokens();
        let job = Job {
            template: template.source().into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            messages: messages.into(),
            add_generation_prompt,
        };
        let mut line = serde_json::to_vec(&job).map_err(|e| ChatError::Render(format!("encoding a render: {e}")))?;
        line.push(b'\n');
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut worker = match idle {
            Some(worker) => worker,
            None => self.start()?,
        };
        match tokio::time::timeout(RENDER_TIMEOUT, worker.exchange(&line)).await {
            Ok(Ok(answer)) => {
                self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(worker);
                match answer {
                    Answer::Prompt(prompt) => Ok(prompt),
                    Answer::Error(e) => Err(e),
                }
            }
            Ok(Err(Failure::Stopped)) => Err(stopped(worker.stopped().await)),
            Ok(Err(Failure::Garbled(what))) => {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                Err(ChatError::Render(format!(
                    "the chat template's renderer answered {what}"
                )))
            }
            Err(_) => {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                Err(timed_out())
            }
        }
    }

    fn start(&self) -> Result<Worker, ChatError> {
        let mut child = Command::new(&self.exe)
            .arg(WORKER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                tracing::error!(exe = %self.exe.display(), "cannot start a chat template renderer: {e}");
                ChatError::Render(format!("the chat template renderer could not be started: {e}"))
            })?;
        match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => Ok(Worker {
                child,
                stdin,
                stdout: BufReader::new(stdout),
            }),
            _ => Err(ChatError::Render("the chat template renderer has no pipes".into())),
        }
    }
}

impl Worker {
    async fn exchange(&mut self, job: &[u8]) -> Result<Answer, Failure> {
        if self.stdin.write_all(job).await.is_err() || self.stdin.flush().await.is_err() {
            return Err(Failure::Stopped);
        }
        let mut answer = String::new();
        match self.stdout.read_line(&mut answer).await {
            Ok(0) | Err(_) => Err(Failure::Stopped),
            Ok(_) => serde_json::from_str(&answer).map_err(|e| Failure::Garbled(format!("garbled JSON ({e})"))),
        }
    }

    /// The exit status of a worker whose pipes broke (killed if it has not exited within a second).
    async fn stopped(mut self) -> Option<std::process::ExitStatus> {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await.ok()
            }
        }
    }
}

fn stopped(status: Option<std::process::ExitStatus>) -> ChatError {
    use std::os::unix::process::ExitStatusExt;
    let limit = WORKER_MEMORY_BYTES >> 20;
    // Rust aborts (SIGABRT) when an allocation fails, which is how a template over the limit ends.
    match status.and_then(|s| s.signal()) {
        Some(signal) if signal == nix::sys::signal::Signal::SIGABRT as i32 => ChatError::Render(format!(
            "the chat template needed more than the {limit} MiB of memory a render may use"
        )),
        _ => {
            let how = status.map_or_else(|| "for an unknown reason".to_string(), |s| s.to_string());
            tracing::warn!("a chat template renderer stopped ({how})");
            ChatError::Render(format!(
                "the chat template's renderer stopped ({how}); a render may use {limit} MiB of memory"
            ))
        }
    }
}

fn timed_out() -> ChatError {
    ChatError::Render(format!(
        "the chat template took longer than {} s to render",
        RENDER_TIMEOUT.as_secs()
    ))
}
