//! A tiny HTTP/1.1 server on 127.0.0.1 for tests that must not touch the internet.
//!
//! One thread accepts; each connection gets one request and one response, then is closed
//! (`Connection: close`), which keeps the server free of keep-alive state. Every request is
//! recorded so tests can assert what the client sent (a `Range` header, say). A response can be
//! cut short after N body bytes to simulate a connection dropped mid-download.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send only this many body bytes (after a full Content-Length), then close.
    pub cut_after: Option<usize>,
}

impl Response {
    pub fn ok(body: impl Into<Vec<u8>>) -> Response {
        Response { status: 200, headers: Vec::new(), body: body.into(), cut_after: None }
    }

    pub fn status(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new(), cut_after: None }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn with_status(mut self, status: u16) -> Response {
        self.status = status;
        self
    }

    pub fn cut_after(mut self, n: usize) -> Response {
        self.cut_after = Some(n);
        self
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

pub struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    /// Starts serving `handler` on an ephemeral loopback port. The thread lives as long as the
    /// test process; each test starts its own server.
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (handler, recorded) = (handler.clone(), recorded.clone());
                thread::spawn(move || serve(stream, &*handler, &recorded));
            }
        });
        Server { addr, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// A URL on a loopback port where nothing listens (bound, then released).
pub fn dead_url(path: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}{path}")
}

fn serve(stream: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Request>>) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    recorded.lock().unwrap().push(request.clone());
    let response = handler(&request);
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", response.status);
    if !response.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    for (k, v) in &response.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if out.write_all(head.as_bytes()).is_err() || request.method == "HEAD" {
        return;
    }
    let n = response.cut_after.unwrap_or(response.body.len()).min(response.body.len());
    let _ = out.write_all(&response.body[..n]);
    let _ = out.flush();
    // Dropping the stream closes it; with a cut body the client sees EOF before Content-Length.
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Some(Request { method, path, headers })
}
