//! A local HTTP server that speaks the Hugging Face Hub's file API (`/{repo}/resolve/{rev}/{file}`,
//! with the `etag`, `x-repo-commit` and `Content-Range` headers hf-hub relies on) from a folder, so
//! the real download path is tested without a network. Test-only (the unit tests include it as a
//! module, the process tests by path).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// A closed gate holds requests for chosen repos until [`Gate::open`] (a hub that hangs), without sleeps.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    /// Requests now waiting at the gate.
    pub waiting: AtomicUsize,
}

impl Gate {
    /// Lets every held and future request through.
    pub fn open(&self) {
        if let Ok(mut g) = self.open.lock() {
            *g = true;
        }
        self.cv.notify_all();
    }

    fn pass(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut g) = self.open.lock() {
            while !*g {
                match self.cv.wait(g) {
                    Ok(next) => g = next,
                    Err(_) => break,
                }
            }
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A broken hub for one repo, until [`Faults::clear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every request for the repo gets this HTTP status (e.g. 500, 503).
    Status(u16),
    /// `.safetensors` files are served as bytes that are not safetensors (with their own etag).
    Corrupt,
    /// A `.safetensors` download (not hf-hub's one-byte metadata request) gets its headers and half its
    /// body, then nothing more (the connection stays open) until [`Faults::end_stalls`]: a hub that stops
    /// sending in the middle of a file.
    StallBody,
}

/// Faults injected per repo.
#[derive(Default)]
pub struct Faults {
    map: Mutex<HashMap<String, Fault>>,
    /// Where stalled downloads wait.
    stalled: Gate,
    /// Stalled downloads whose client had closed the connection when the stall ended.
    abandoned: AtomicUsize,
}

impl Faults {
    /// Breaks `repo` with `fault`.
    pub fn set(&self, repo: &str, fault: Fault) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(repo.to_string(), fault);
        }
    }

    /// Serves `repo` correctly again (downloads stalled before stay stalled).
    pub fn clear(&self, repo: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(repo);
        }
    }

    /// Downloads now stalled.
    pub fn stalled(&self) -> usize {
        self.stalled.waiting.load(Ordering::SeqCst)
    }

    /// Ends every stalled download (its connection closes short of the body).
    pub fn end_stalls(&self) {
        self.stalled.open();
    }

    /// Stalled downloads, ended by [`Faults::end_stalls`], whose client had already closed the
    /// connection (it gave up on the download rather than kept waiting).
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::SeqCst)
    }

    fn of(&self, path: &str) -> Option<Fault> {
        let m = self.map.lock().ok()?;
        m.iter()
            .find(|(repo, _)| path.starts_with(&format!("/{repo}/")))
            .map(|(_, f)| *f)
    }
}

/// A running server; it stops when the test process ends.
pub struct HubServer {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// Requests served so far.
    pub requests: Arc<AtomicUsize>,
    /// Holds requests for the repos given to [`start_gated`].
    pub gate: Arc<Gate>,
    /// Faults injected per repo.
    pub faults: Arc<Faults>,
}

/// Serve `repos` (repo id → folder) with the given required bearer token (if any).
pub fn start(repos: Vec<(String, PathBuf)>, token: Option<String>) -> std::io::Result<HubServer> {
    start_gated(repos, token, Vec::new())
}

/// [`start`], holding every request for a repo in `gated` at the server's closed [`Gate`].
pub fn start_gated(
    repos: Vec<(String, PathBuf)>,
    token: Option<String>,
    gated: Vec<String>,
) -> std::io::Result<HubServer> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let requests = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&requests);
    let gate = Arc::new(Gate::default());
    let held = Arc::clone(&gate);
    let faults = Arc::new(Faults::default());
    let injected = Arc::clone(&faults);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let repos = repos.clone();
            let token = token.clone();
            let gated = gated.clone();
            let gate = Arc::clone(&held);
            let faults = Arc::clone(&injected);
            std::thread::spawn(move || {
                let _ = handle(stream, &repos, token.as_deref(), &gated, &gate, &faults);
            });
        }
    });
    Ok(HubServer {
        endpoint,
        requests,
        gate,
        faults,
    })
}

fn handle(
    mut stream: TcpStream,
    repos: &[(String, PathBuf)],
    token: Option<&str>,
    gated: &[String],
    gate: &Gate,
    faults: &Faults,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut range: Option<(usize, Option<usize>)> = None;
    let mut auth: Option<String> = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let v = v.trim();
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
        if lower.starts_with("authorization:") {
            auth = Some(h["authorization:".len()..].trim().to_string());
        }
    }
    if gated.iter().any(|g| path.starts_with(&format!("/{g}/"))) {
        gate.pass();
    }
    let fault = faults.of(&path);
    if let Some(Fault::Status(code)) = fault {
        return respond(&mut stream, &format!("{code} Injected Fault"), &[], b"injected fault");
    }
    if let Some(t) = token {
        if auth.as_deref() != Some(&format!("Bearer {t}")) {
            return respond(&mut stream, "401 Unauthorized", &[], b"unauthorized");
        }
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let found = repos.iter().find_map(|(id, dir)| {
        let rest = path.strip_prefix(&format!("/{id}/resolve/"))?;
        let (_rev, file) = rest.split_once('/')?;
        if file.contains("..") {
            return None;
        }
        let p = dir.join(file);
        p.is_file().then_some(p)
    });
    let Some(file) = found else {
        return respond(
            &mut stream,
            "404 Not Found",
            &[("x-error-code", "EntryNotFound".into())],
            b"not found",
        );
    };
    // Only the bytes asked for are read: a test may serve a large sparse file.
    let corrupt = fault == Some(Fault::Corrupt) && file.extension().is_some_and(|e| e == "safetensors");
    let corrupted: &[u8] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors, corrupted by the test hub}";
    let total = if corrupt {
        corrupted.len()
    } else {
        usize::try_from(std::fs::metadata(&file)?.len()).unwrap_or(usize::MAX)
    };
    let read = |a: usize, n: usize| -> std::io::Result<Vec<u8>> {
        if corrupt {
            return Ok(corrupted[a..a + n].to_vec());
        }
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&file)?;
        f.seek(std::io::SeekFrom::Start(a as u64))?;
        let mut buf = vec![0; n];
        f.read_exact(&mut buf)?;
        Ok(buf)
    };
    let etag = format!("\"{:x}-{}\"", total, file.file_name().map(|n| n.len()).unwrap_or(0));
    let commit = "0123456789abcdef0123456789abcdef01234567".to_string();
    let (status, data, cr) = match range {
        Some((a, b)) if a < total => {
            let end = b.unwrap_or(total - 1).min(total - 1);
            (
                "206 Partial Content",
                read(a, end + 1 - a)?,
                Some(format!("bytes {a}-{end}/{total}")),
            )
        }
        _ => ("200 OK", read(0, total)?, None),
    };
    let body = &data[..];
    let mut headers = vec![("etag", etag), ("x-repo-commit", commit)];
    if let Some(cr) = cr {
        headers.push(("content-range", cr));
    }
    if method == "HEAD" {
        return respond(&mut stream, status, &headers, b"");
    }
    let metadata = matches!(range, Some((0, Some(0))));
    if fault == Some(Fault::StallBody) && file.extension().is_some_and(|e| e == "safetensors") && !metadata {
        write_head(&mut stream, status, &headers, body.len())?;
        stream.write_all(&body[..body.len() / 2])?;
        stream.flush()?;
        faults.stalled.pass();
        if peer_closed(&stream) {
            faults.abandoned.fetch_add(1, Ordering::SeqCst);
        }
        return Ok(());
    }
    respond(&mut stream, status, &headers, body)
}

/// Whether the client has closed `stream` (it sends nothing after its request, so a read that finds the
/// end of the stream, or a reset, means it is gone).
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

fn write_head(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], length: usize) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {length}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    write_head(stream, status, headers, body.len())?;
    stream.write_all(body)?;
    stream.flush()
}
