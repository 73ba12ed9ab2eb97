//! A fake Hugging Face Hub on the loopback interface, for testing downloads without the Hub.
//!
//! It answers the three requests `hf-hub`'s client makes, the way the Hub does:
//! - `GET /api/{models|datasets}/{org}/{name}/revision/{revision}`: `{"sha", "siblings"}`;
//! - `GET [/datasets]/{org}/{name}/resolve/{revision}/{file}` with `Range: bytes=a-b`: 206 with
//!   `Content-Range`, `ETag` and `X-Repo-Commit` (a 1-byte range first, for the metadata);
//! - 404 with `X-Error-Code` for an unknown repo, revision or file.
//!
//! Every request is logged, so a test can tell which were made (none, once everything is cached).
//! A file can be set to break its first download after a number of bytes, to test resuming.
//! The server serves one connection at a time, answers at most [`MAX_REQUESTS`] requests, and
//! stops when dropped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A bound on the requests one server answers, so a client stuck in a loop cannot spin forever.
pub const MAX_REQUESTS: usize = 2_000;

/// One repository the fake Hub serves, at one commit.
#[derive(Clone, Debug)]
pub struct FakeRepo {
    /// `models` or `datasets`.
    pub kind: &'static str,
    pub id: String,
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl FakeRepo {
    pub fn model(id: &str, commit: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            kind: "models",
            id: id.to_owned(),
            commit: commit.to_owned(),
            files,
        }
    }

    pub fn dataset(id: &str, commit: &str, files: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            kind: "datasets",
            ..Self::model(id, commit, files)
        }
    }
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    log: Vec<String>,
    /// File name → bytes after which its next full download is cut off.
    break_after: BTreeMap<String, usize>,
}

/// A running fake Hub; dropping it stops the server.
pub struct FakeHub {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().take(MAX_REQUESTS) {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        // A client that hangs up mid-answer is the client's problem.
                        let _ = serve(stream, &state);
                    }
                }
            })
        };
        Self {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The value for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far, as `GET /path Range`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("state").log.clone()
    }

    /// Cuts the next full download of `file` off after `bytes` bytes (the connection closes early).
    pub fn break_next_download(&self, file: &str, bytes: usize) {
        self.state
            .lock()
            .expect("state")
            .break_after
            .insert(file.to_owned(), bytes);
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Request {
    path: String,
    range: Option<(usize, Option<usize>)>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(_method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let path = path.to_owned();
    let mut range = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("range")
        {
            range = parse_range(value.trim());
        }
    }
    Ok(Some(Request { path, range }))
}

/// `bytes=a-b` or `bytes=a-`.
fn parse_range(value: &str) -> Option<(usize, Option<usize>)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start = start.parse().ok()?;
    let end = if end.is_empty() {
        None
    } else {
        Some(end.parse().ok()?)
    };
    Some((start, end))
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some(request) = read_request(&stream)? else {
        return Ok(());
    };
    let mut state = state.lock().expect("state");
    let range_note = match request.range {
        Some((a, Some(b))) => format!(" bytes={a}-{b}"),
        Some((a, None)) => format!(" bytes={a}-"),
        None => String::new(),
    };
    state.log.push(format!("GET {}{range_note}", request.path));
    let path = request.path.replace("%2F", "/").replace("%2f", "/");

    if let Some(rest) = path.strip_prefix("/api/") {
        return match find_info(&state.repos, rest) {
            Some(repo) => {
                let siblings: Vec<serde_json::Value> = repo
                    .files
                    .keys()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body =
                    serde_json::json!({ "id": repo.id, "sha": repo.commit, "siblings": siblings });
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type", "application/json".to_owned())],
                    body.to_string().as_bytes(),
                )
            }
            None => not_found(&mut stream, "RepoNotFound"),
        };
    }
    let Some((repo, file)) = find_file(&state.repos, &path) else {
        return not_found(&mut stream, "EntryNotFound");
    };
    let (commit, bytes) = (repo.commit.clone(), repo.files[&file].clone());
    let size = bytes.len();
    let etag = format!("\"{}\"", blake3::hash(&bytes).to_hex());
    let (start, end) = match request.range {
        Some((start, end)) => (start, end.unwrap_or(size.saturating_sub(1))),
        None => (0, size.saturating_sub(1)),
    };
    if start >= size && size > 0 {
        return respond(
            &mut stream,
            "416 Range Not Satisfiable",
            &[("Content-Range", format!("bytes */{size}"))],
            b"",
        );
    }
    let end = end.min(size.saturating_sub(1)).max(start);
    let body = if size == 0 {
        &[][..]
    } else {
        &bytes[start..=end]
    };
    let headers = [
        ("ETag", etag),
        ("X-Repo-Commit", commit),
        ("Content-Range", format!("bytes {start}-{end}/{size}")),
        ("Accept-Ranges", "bytes".to_owned()),
    ];
    let is_full_download = end > start;
    match state.break_after.get(&file).copied() {
        Some(cut) if is_full_download && cut < body.len() => {
            state.break_after.remove(&file);
            // Promise the whole body, send part of it, hang up.
            write_head(&mut stream, "206 Partial Content", &headers, body.len())?;
            stream.write_all(&body[..cut])?;
            stream.flush()
        }
        _ => respond(&mut stream, "206 Partial Content", &headers, body),
    }
}

fn find_info<'a>(repos: &'a [FakeRepo], rest: &str) -> Option<&'a FakeRepo> {
    let (kind, rest) = rest.split_once('/')?;
    let (id, revision) = rest.split_once("/revision/")?;
    repos
        .iter()
        .find(|r| r.kind == kind && r.id == id && (revision == "main" || revision == r.commit))
}

fn find_file(repos: &[FakeRepo], path: &str) -> Option<(FakeRepo, String)> {
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets", rest),
        None => ("models", path.strip_prefix('/')?),
    };
    let (id, rest) = rest.split_once("/resolve/")?;
    let repo = repos.iter().find(|r| r.kind == kind && r.id == id)?;
    // The revision may itself hold slashes (`refs/convert/parquet`): try each split point.
    for (i, _) in rest.match_indices('/') {
        let (revision, file) = (&rest[..i], &rest[i + 1..]);
        if (revision == "main" || revision == repo.commit) && repo.files.contains_key(file) {
            return Some((repo.clone(), file.to_owned()));
        }
    }
    None
}

fn write_head(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    length: usize,
) -> std::io::Result<()> {
    let mut head =
        format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(stream, status, headers, body.len())?;
    stream.write_all(body)?;
    stream.flush()
}

fn not_found(stream: &mut TcpStream, code: &str) -> std::io::Result<()> {
    respond(
        stream,
        "404 Not Found",
        &[("X-Error-Code", code.to_owned())],
        b"",
    )
}
