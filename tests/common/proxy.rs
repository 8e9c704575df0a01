//! A TCP proxy in front of DynamoDB Local that injects network faults:
//! connections cut part-way through a request or its answer (reset, or
//! closed), at random from a fixed seed, or every request held back.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A proxy to `upstream` (`host:port`): each connection accepted gets a
/// connection of its own to `upstream` and `handle(client, server)` on a
/// thread of its own. Returns the proxy's endpoint (`http://…`).
pub fn relay(upstream: &str, handle: impl Fn(TcpStream, TcpStream) + Clone + Send + 'static) -> String {
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || handle(client, server));
        }
    });
    endpoint
}

/// One HTTP/1.1 message (request or answer) read whole from `from`: its
/// bytes as sent, `None` at the end of the stream or on an error. Bodies
/// have a Content-Length or are chunked (as DynamoDB and the SDK send them).
pub fn read_message(from: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let start = message.len();
        if from.read_until(b'\n', &mut message).ok()? == 0 {
            return None;
        }
        let line = String::from_utf8_lossy(&message[start..]).to_string();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            if name == "content-length" {
                length = value.parse().ok()?;
            }
            chunked |= name == "transfer-encoding" && value.contains("chunked");
        }
    }
    if !chunked {
        let start = message.len();
        message.resize(start + length, 0);
        from.read_exact(&mut message[start..]).ok()?;
        return Some(message);
    }
    loop {
        let start = message.len();
        from.read_until(b'\n', &mut message).ok()?;
        let size = String::from_utf8_lossy(&message[start..]).trim().split(';').next()?.to_string();
        let size = usize::from_str_radix(&size, 16).ok()?;
        // The chunk and its CRLF; the last (empty) chunk ends with the trailers' blank line.
        let start = message.len();
        message.resize(start + size, 0);
        from.read_exact(&mut message[start..]).ok()?;
        loop {
            let start = message.len();
            if from.read_until(b'\n', &mut message).ok()? == 0 {
                return None;
            }
            if &message[start..] == b"\r\n" || size > 0 {
                break;
            }
        }
        if size == 0 {
            return Some(message);
        }
    }
}

/// What the proxy does to each request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Nothing: requests and answers pass untouched.
    None,
    /// Cuts the connection of this share of the requests, at a random
    /// point of the request or of its answer, with a reset (SO_LINGER 0)
    /// or a plain close.
    Cut(f64),
    /// Holds every request this long before passing it on.
    Delay(Duration),
}

/// What the proxy has done.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyCounts {
    /// Requests seen.
    pub requests: u64,
    /// Connections cut in the middle of a request / of its answer.
    pub cut_requests: u64,
    pub cut_answers: u64,
    /// Requests held back.
    pub delayed: u64,
}

/// Called with each request before the proxy passes it on.
type Hook = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct State {
    fault: Fault,
    hook: Option<Hook>,
    /// splitmix64 state: the same seed cuts the same way.
    rng: u64,
    counts: ProxyCounts,
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to one request.
enum Plan {
    Pass,
    Delay(Duration),
    /// Cut after this many bytes of the request, or after this share of
    /// its answer; reset or close.
    CutRequest(usize, bool),
    CutAnswer(f64, bool),
}

/// A fault-injecting proxy in front of a DynamoDB endpoint.
pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://host:port`), passing everything until
    /// told otherwise; `seed` fixes which requests are cut and where.
    pub fn start(upstream: &str, seed: u64) -> Self {
        let state =
            Arc::new(Mutex::new(State { fault: Fault::None, hook: None, rng: seed, counts: ProxyCounts::default() }));
        let shared = Arc::clone(&state);
        let endpoint = relay(upstream, move |client, server| serve(client, server, &shared));
        FaultProxy { endpoint, state }
    }

    /// Applies `fault` to the requests from now on.
    pub fn set(&self, fault: Fault) {
        self.state.lock().unwrap().fault = fault;
    }

    /// Calls `hook` with each request from now on, before passing it on
    /// (a test can freeze the store at the request it waits for).
    pub fn before_request(&self, hook: impl Fn(&[u8]) + Send + Sync + 'static) {
        self.state.lock().unwrap().hook = Some(Arc::new(hook));
    }

    pub fn counts(&self) -> ProxyCounts {
        self.state.lock().unwrap().counts
    }
}

/// Serves one connection: request, answer, request, answer…
fn serve(client: TcpStream, server: TcpStream, state: &Mutex<State>) {
    let mut from_client = BufReader::new(&client);
    let mut from_server = BufReader::new(&server);
    while let Some(request) = read_message(&mut from_client) {
        let hook = state.lock().unwrap().hook.clone();
        if let Some(hook) = hook {
            hook(&request);
        }
        let plan = {
            let mut s = state.lock().unwrap();
            s.counts.requests += 1;
            let fault = s.fault;
            match fault {
                Fault::None => Plan::Pass,
                Fault::Delay(d) => {
                    s.counts.delayed += 1;
                    Plan::Delay(d)
                }
                Fault::Cut(share) if s.unit() < share => {
                    let (in_answer, reset, at) = (s.next().is_multiple_of(2), s.next().is_multiple_of(2), s.unit());
                    if in_answer {
                        s.counts.cut_answers += 1;
                        Plan::CutAnswer(at, reset)
                    } else {
                        s.counts.cut_requests += 1;
                        Plan::CutRequest((at * request.len() as f64) as usize, reset)
                    }
                }
                Fault::Cut(_) => Plan::Pass,
            }
        };
        match plan {
            Plan::Pass => {}
            Plan::Delay(d) => std::thread::sleep(d),
            Plan::CutRequest(at, reset) => {
                let _ = (&server).write_all(&request[..at]);
                return cut(client, server, reset);
            }
            Plan::CutAnswer(..) => {}
        }
        if (&server).write_all(&request).is_err() {
            break;
        }
        let Some(answer) = read_message(&mut from_server) else { break };
        if let Plan::CutAnswer(at, reset) = plan {
            let _ = (&client).write_all(&answer[..(at * answer.len() as f64) as usize]);
            return cut(client, server, reset);
        }
        if (&client).write_all(&answer).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Ends both connections: with a reset (SO_LINGER 0, then close), or with a
/// plain close.
fn cut(client: TcpStream, server: TcpStream, reset: bool) {
    for stream in [client, server] {
        if reset {
            let _ = tokio::net::TcpSocket::from_std_stream(stream).set_zero_linger();
        } else {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
