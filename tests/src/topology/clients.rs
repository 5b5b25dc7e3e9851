//! Clients in a topology's namespaces: curl, dig, socat, and long-lived TCP
//! connections (a python client) that send a line and read the answer over
//! the same flow. Every backend answer is parsed into a [`Reply`]: which
//! backend answered and which peer address it saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::processes::{background, kill_group, python};
use super::Topology;

/// Python client holding one TCP connection: each stdin line is sent, each
/// answer line printed; `EOF`/`ERROR ...` when the connection breaks.
const CLIENT_PY: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    f = s.makefile("rw")
    print("connected", flush=True)
    for line in sys.stdin:
        f.write(line)
        f.flush()
        answer = f.readline()
        if not answer:
            print("EOF", flush=True)
            sys.exit(1)
        print(answer.strip(), flush=True)
except Exception as e:
    print(f"ERROR {e}", flush=True)
    sys.exit(1)
"#;

/// Python client holding one *connected* UDP socket, as a long-lived
/// resolver or metrics client does: each stdin line is sent, the answer
/// printed with ` reconnects=N` appended. When the socket fails (destroyed
/// under it: ECONNABORTED, EDESTADDRREQ) it connects a new one and sends
/// again, as such clients do; a timeout prints `ERROR timeout`.
const UDP_CLIENT_PY: &str = r#"
import errno, socket, sys
target = (sys.argv[1], int(sys.argv[2]))
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(target)
    return s
reconnects = 0
try:
    s = connect()
    print("connected", flush=True)
    for line in sys.stdin:
        for attempt in range(3):
            try:
                s.send(line.encode())
                answer = s.recv(4096).decode().strip()
                print(f"{answer} reconnects={reconnects}", flush=True)
                break
            except socket.timeout:
                print("ERROR timeout", flush=True)
                break
            except OSError as e:
                reconnects += 1
                sys.stderr.write(f"reconnecting after {errno.errorcode.get(e.errno, e.errno)}\n")
                s.close()
                s = connect()
        else:
            print("ERROR no answer after reconnecting", flush=True)
except Exception as e:
    print(f"ERROR {e}", flush=True)
    sys.exit(1)
"#;

/// Writes the client scripts into the topology's directory.
pub(super) fn install_scripts(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("client.py"), CLIENT_PY)?;
    std::fs::write(dir.join("udp_client.py"), UDP_CLIENT_PY)?;
    Ok(())
}

/// What a backend started by [`Topology::spawn_backend`] answered: parsed from
/// `backend=NAME proto=P client=IP:PORT ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub proto: String,
    pub client: SocketAddrV4,
    pub raw: String,
}

impl Reply {
    pub fn parse(text: &str) -> Result<Reply> {
        let line = text
            .lines()
            .find(|l| l.contains("backend="))
            .ok_or_else(|| anyhow!("not a backend answer: {text:?}"))?;
        let mut fields = BTreeMap::new();
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                fields.insert(k, v);
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| anyhow!("no {k}= in backend answer {line:?}"))
        };
        Ok(Reply {
            backend: get("backend")?.to_string(),
            proto: get("proto")?.to_string(),
            client: get("client")?
                .parse()
                .with_context(|| format!("client= in {line:?}"))?,
            raw: line.to_string(),
        })
    }
}

/// A long-lived TCP connection opened by [`Topology::connect`].
pub struct Connection {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub target: SocketAddrV4,
}

impl Connection {
    fn read_line(&mut self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .map_err(|e| anyhow!("connection to {}: no answer ({e})", self.target))
    }

    /// Sends `line` and returns the backend's answer.
    pub fn send(&mut self, line: &str) -> Result<Reply> {
        let stdin = self.stdin.as_mut().expect("open");
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let answer = self.read_line(Duration::from_secs(12))?;
        Reply::parse(&answer).with_context(|| format!("connection to {}", self.target))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stdin.take();
        kill_group(&mut self.child);
    }
}

impl Topology {
    /// `curl` from `who`; the body on success.
    pub fn curl(&self, who: &str, url: &str) -> Result<String> {
        self.exec(
            who,
            &[
                "curl",
                "-sS",
                "--connect-timeout",
                "3",
                "--max-time",
                "5",
                url,
            ],
            Duration::from_secs(10),
        )?
        .ok()
    }

    /// `curl` to one of our backends; which backend answered and what it saw.
    pub fn request(&self, who: &str, url: &str) -> Result<Reply> {
        Reply::parse(&self.curl(who, url)?)
    }

    /// Retries [`request`](Self::request) until it works (the first flow after
    /// the agent published a frontend may race the attachment of programs).
    pub fn request_eventually(&self, who: &str, url: &str, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.request(who, url) {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{who} -> {url}: no answer within {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Sends one line over UDP or TCP with socat from `who`; the answer line.
    pub fn socat_line(
        &self,
        who: &str,
        proto: &str,
        target: SocketAddrV4,
        line: &str,
    ) -> Result<Reply> {
        let script = format!(
            "echo {line} | socat -t 2 -T 3 - {}:{target}",
            match proto {
                "udp" | "UDP" => "UDP4",
                _ => "TCP4",
            }
        );
        let out = self
            .exec(who, &["sh", "-c", &script], Duration::from_secs(10))?
            .ok()?;
        Reply::parse(&out)
    }

    /// `dig TXT whoami.test @server` from `who` (answered by [`spawn_dns`](Self::spawn_dns)
    /// backends with `backend=NAME`): the backend name.
    pub fn dig_whoami(&self, who: &str, server: Ipv4Addr, port: u16, tcp: bool) -> Result<String> {
        let at = format!("@{server}");
        let p = port.to_string();
        let mut argv = vec![
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "-p",
            &p,
            &at,
            "whoami.test",
            "TXT",
        ];
        if tcp {
            argv.push("+tcp");
        }
        let out = self.exec(who, &argv, Duration::from_secs(10))?.ok()?;
        let answer = out.trim().trim_matches('"');
        answer
            .strip_prefix("backend=")
            .map(str::to_string)
            .ok_or_else(|| anyhow!("dig from {who} to {server}:{port}: unexpected answer {out:?}"))
    }

    /// Opens a long-lived TCP connection from `who` to `target` (a python
    /// client): send lines and read answers over the same connection.
    pub fn connect(&self, who: &str, target: SocketAddrV4) -> Result<Connection> {
        self.line_client(who, "client.py", target)
    }

    /// Opens a long-lived *connected* UDP socket from `who` to `target` (a
    /// python client that reconnects when its socket fails; each answer's
    /// `raw` ends with `reconnects=N`).
    pub fn connect_udp(&self, who: &str, target: SocketAddrV4) -> Result<Connection> {
        self.line_client(who, "udp_client.py", target)
    }

    fn line_client(&self, who: &str, script: &str, target: SocketAddrV4) -> Result<Connection> {
        let script = self.dir.join(script);
        let prefix = self.host_prefix(who);
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..])
            .arg(python())
            .arg(&script)
            .arg(target.ip().to_string())
            .arg(target.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        background(&mut c);
        let mut child = c
            .spawn()
            .with_context(|| format!("spawning the client {}", script.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut conn = Connection {
            child,
            stdin: Some(stdin),
            lines: rx,
            target,
        };
        let first = conn.read_line(Duration::from_secs(12))?;
        if first != "connected" {
            bail!("{who} -> {target}: {first}");
        }
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_replies() {
        let r = Reply::parse("backend=web1 proto=http client=10.244.1.2:40000 path=/\n").unwrap();
        assert_eq!(r.backend, "web1");
        assert_eq!(r.proto, "http");
        assert_eq!(r.client, "10.244.1.2:40000".parse().unwrap());
        assert!(Reply::parse("<html>").is_err());
    }
}
