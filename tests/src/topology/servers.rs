//! The backends of a topology, in pods: a python server speaking HTTP, a
//! TCP line echo and a UDP datagram echo that name themselves and the peer
//! they saw, and dnsmasq answering a TXT record with its pod's name.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::processes::python;
use super::Topology;

/// Python backend server: `server.py NAME SPEC...`, SPEC = `http:PORT`,
/// `tcp:PORT` (line echo) or `udp:PORT` (datagram echo). Every answer names the
/// backend and the peer it saw: `backend=NAME proto=P client=IP:PORT ...`.
const SERVER_PY: &str = r#"
import http.server, socket, socketserver, sys, threading
name = sys.argv[1]

class Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ip, port = self.client_address[:2]
        body = f"backend={name} proto=http client={ip}:{port} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        sys.stderr.write("http %s %s\n" % (self.client_address[0], fmt % args))

class Line(socketserver.StreamRequestHandler):
    def handle(self):
        ip, port = self.client_address[:2]
        for raw in self.rfile:
            line = raw.decode(errors="replace").strip()
            self.wfile.write(f"backend={name} proto=tcp client={ip}:{port} line={line}\n".encode())
            self.wfile.flush()

class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        ip, port = self.client_address[:2]
        line = data.decode(errors="replace").strip()
        sock.sendto(f"backend={name} proto=udp client={ip}:{port} line={line}\n".encode(), self.client_address)

# socketserver listens with a backlog of 5: a test opening hundreds of
# connections at once would see handshakes stall in the full accept queue.
class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

class HttpServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

servers = []
for spec in sys.argv[2:]:
    kind, port = spec.split(":")
    port = int(port)
    if kind == "http":
        servers.append(HttpServer(("0.0.0.0", port), Http))
    elif kind == "tcp":
        servers.append(TcpServer(("0.0.0.0", port), Line))
    elif kind == "udp":
        servers.append(socketserver.ThreadingUDPServer(("0.0.0.0", port), Udp))
    else:
        sys.exit(f"unknown server kind {kind}")
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Writes the server script into the topology's directory.
pub(super) fn install_scripts(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("server.py"), SERVER_PY)?;
    Ok(())
}

impl Topology {
    /// Starts the python backend in pod `pod`: `servers` like `["http:8080",
    /// "tcp:9000", "udp:9000"]`; waits until every port listens.
    pub fn spawn_backend(&self, pod: &str, servers: &[&str]) -> Result<()> {
        let script = self.dir.join("server.py");
        let script = script.to_string_lossy();
        let mut argv = vec![python(), &script, pod];
        argv.extend_from_slice(servers);
        let name = format!("server-{pod}");
        self.spawn(pod, &name, &argv)?;
        for s in servers {
            let (kind, port) = s
                .split_once(':')
                .ok_or_else(|| anyhow!("bad server spec {s}"))?;
            let port: u16 = port.parse()?;
            self.wait_listening(pod, &name, if kind == "udp" { "udp" } else { "tcp" }, port)?;
        }
        Ok(())
    }

    /// Starts dnsmasq in pod `pod` on UDP and TCP `port`, answering
    /// `whoami.test TXT "backend=<pod>"`.
    pub fn spawn_dns(&self, pod: &str, port: u16) -> Result<()> {
        let name = format!("dnsmasq-{pod}");
        let port_arg = format!("--port={port}");
        let txt = format!("--txt-record=whoami.test,backend={pod}");
        self.spawn(
            pod,
            &name,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--pid-file",
                "--user=root",
                &port_arg,
                &txt,
            ],
        )?;
        self.wait_listening(pod, &name, "udp", port)?;
        self.wait_listening(pod, &name, "tcp", port)
    }

    /// Waits until a socket listens on `proto`/`port` in `who`'s namespace;
    /// fails at once if the process spawned as `proc_name` died.
    fn wait_listening(&self, who: &str, proc_name: &str, proto: &str, port: u16) -> Result<()> {
        let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.exec(who, &["ss", flag, &filter], Duration::from_secs(5))?;
            if out.success() && !out.stdout.trim().is_empty() {
                return Ok(());
            }
            self.check_running(proc_name)?;
            if Instant::now() >= deadline {
                bail!("{proc_name} does not listen on {proto}/{port} in {who}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
