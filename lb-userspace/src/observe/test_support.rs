//! Helpers shared by the unit tests of the HTTP handlers (health, metrics)
//! and of the server they run on (http).
//!
//! Handler tests call the handlers directly (no sockets). Listener tests run
//! in a private network namespace created by the test ([`in_private_netns`]),
//! never in the root one, so fixed ports cannot collide with the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Response, StatusCode};

/// A GET request for `path` (handlers are called directly, no sockets).
pub fn get(path: &str) -> Request<()> {
    Request::builder().uri(path).body(()).expect("request")
}

/// Status, headers and body text of a handler's response.
pub fn read_response(resp: Response<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    let (parts, body) = resp.into_parts();
    let bytes = futures::executor::block_on(body.collect())
        .expect("Full never fails")
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
    )
}

/// Runs `f` on a new thread inside a fresh network namespace (only `lo`, up).
/// Needs root; without it the test is skipped, or fails when
/// `LB_REQUIRE_PRIVILEGED=1`.
pub fn in_private_netns(test: &str, f: impl FnOnce() + Send + 'static) {
    let required = std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!required, "{test}: needs root (LB_REQUIRE_PRIVILEGED=1)");
        eprintln!("SKIPPED {test}: needs root to create a network namespace");
        return;
    }
    let test = test.to_string();
    let res = std::thread::spawn(move || {
        let before = std::fs::metadata("/proc/thread-self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            assert!(!required, "{test}: unshare(CLONE_NEWNET): {e}");
            eprintln!("SKIPPED {test}: unshare(CLONE_NEWNET): {e}");
            return;
        }
        let after = std::fs::metadata("/proc/thread-self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        assert!(
            before.is_ok() && after.is_ok() && before.ok() != after.ok(),
            "{test}: not in a new network namespace"
        );
        // Children of this thread (the `ip` process, runtime threads,
        // client threads) inherit the namespace.
        let st = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip link set lo up: {st}");
        f();
    })
    .join();
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One HTTP answer as read off the wire.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One HTTP/1.1 GET on `stream` (kept alive); reads exactly one answer.
pub fn request(stream: &mut TcpStream, path: &str) -> Answer {
    request_raw(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"),
    )
}

/// Writes `raw` (one whole request) on `stream`; reads exactly one answer.
pub fn request_raw(stream: &mut TcpStream, raw: &str) -> Answer {
    stream.write_all(raw.as_bytes()).expect("write request");
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("header line");
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("content-length");
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).expect("body");
    Answer {
        status,
        headers,
        body: String::from_utf8(body).expect("utf-8"),
    }
}

pub fn get_once(port: u16, path: &str) -> Answer {
    let mut s = connect(port).unwrap_or_else(|e| panic!("connect :{port}: {e}"));
    request(&mut s, path)
}

/// True when the server closed `stream`: a request gets end of file or a
/// reset instead of an answer. (A read timeout is not a close.)
pub fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    let _ = write!(stream, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    match stream.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Asserts that `port` refuses connections, allowing a short grace period:
/// our listener is closed when `sync` returns (or the serving task is gone),
/// but a process forked by another test at that moment may hold a copy of
/// the descriptor until it execs (sockets are close-on-exec).
pub fn assert_refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            Err(e) => panic!("connect :{port}: unexpected error {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "port {port} still accepts connections"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
