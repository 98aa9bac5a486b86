//! Interactive exec through the daemon's API: stdin, terminals, resizes and
//! signals, spoken by hand over the Unix socket — either (`?stream=raw`) a
//! chunked HTTP/1.1 request whose body carries the client's frames while
//! the answer's body carries the process's, or (`Upgrade:
//! airlock-exec-stream`) a `101` after which the connection carries them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::daemon_harness::TestDaemon;
use super::support::wait_until;

/// One interactive exec on its own connection.
struct Session {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// The answer's body as read so far, not yet split into frames.
    body: Vec<u8>,
    /// The connection was upgraded: frames travel bare, not in chunks.
    upgraded: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Session {
    fn connect(d: &TestDaemon, upgraded: bool) -> Session {
        let conn = UnixStream::connect(&d.socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Session {
            writer: conn.try_clone().unwrap(),
            reader: BufReader::new(conn),
            body: Vec::new(),
            upgraded,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Sends the request head and the JSON request line, then reads the
    /// answer's head: it must be a 200 with the frame stream.
    fn open(d: &TestDaemon, name: &str, request: Value) -> Session {
        let mut s = Session::connect(d, false);
        let head = format!(
            "POST /v1/sandboxes/{name}/exec?stream=raw HTTP/1.1\r\nHost: airlock\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        s.writer.write_all(head.as_bytes()).unwrap();
        s.chunk(format!("{request}\n").as_bytes());
        let (status, headers) = s.head();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}{headers}\n{}", d.log());
        assert!(headers.contains("content-type: application/vnd.airlock.exec-stream"), "{headers}");
        assert!(headers.contains("transfer-encoding: chunked"), "{headers}");
        s
    }

    /// The `Upgrade` form: the JSON request as the body, then a `101`.
    fn upgrade(d: &TestDaemon, name: &str, request: Value) -> Session {
        let mut s = Session::connect(d, true);
        let request = request.to_string();
        let head = format!(
            "POST /v1/sandboxes/{name}/exec HTTP/1.1\r\nHost: airlock\r\nConnection: Upgrade\r\n\
             Upgrade: airlock-exec-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
            request.len()
        );
        s.writer.write_all(head.as_bytes()).unwrap();
        let (status, headers) = s.head();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}{headers}\n{}", d.log());
        assert!(headers.contains("upgrade: airlock-exec-stream"), "{headers}");
        s
    }

    /// The answer's status line and its headers, lowercased.
    fn head(&mut self) -> (String, String) {
        let mut status = String::new();
        self.reader.read_line(&mut status).unwrap();
        let mut headers = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                return (status, headers);
            }
            headers.push_str(&line.to_ascii_lowercase());
        }
    }

    fn chunk(&mut self, data: &[u8]) {
        if self.upgraded {
            return self.writer.write_all(data).unwrap();
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.writer.write_all(&out).unwrap();
    }

    fn send(&mut self, kind: u8, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        self.chunk(&frame);
    }

    fn stdin(&mut self, data: &str) {
        self.send(0, data.as_bytes());
    }

    fn resize(&mut self, rows: u16, cols: u16) {
        let mut payload = rows.to_be_bytes().to_vec();
        payload.extend_from_slice(&cols.to_be_bytes());
        self.send(4, &payload);
    }

    fn signal(&mut self, signal: i32) {
        self.send(5, &signal.to_be_bytes());
    }

    /// Ends the request body (which closes stdin).
    fn finish(&mut self) {
        self.writer.write_all(b"0\r\n\r\n").unwrap();
    }

    /// The next frame of the answer; `None` at its end.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.body.len() >= 5 {
                let len = u32::from_be_bytes(self.body[1..5].try_into().unwrap()) as usize;
                if self.body.len() >= 5 + len {
                    let frame = (self.body[0], self.body[5..5 + len].to_vec());
                    self.body.drain(..5 + len);
                    return Some(frame);
                }
            }
            if self.upgraded {
                let mut data = vec![0u8; 64 * 1024];
                let n = self.reader.read(&mut data).unwrap();
                if n == 0 {
                    assert!(self.body.is_empty(), "the stream ended inside a frame");
                    return None;
                }
                self.body.extend_from_slice(&data[..n]);
                continue;
            }
            // One chunk of the chunked answer.
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let size =
                usize::from_str_radix(size.trim(), 16).unwrap_or_else(|e| panic!("chunk size {size:?}: {e}"));
            if size == 0 {
                assert!(self.body.is_empty(), "the answer ended inside a frame");
                return None;
            }
            let mut data = vec![0u8; size + 2];
            self.reader.read_exact(&mut data).unwrap();
            assert_eq!(&data[size..], b"\r\n");
            self.body.extend_from_slice(&data[..size]);
        }
    }

    /// Reads output until stdout contains `needle`.
    fn wait_for(&mut self, needle: &str) {
        while !String::from_utf8_lossy(&self.stdout).contains(needle) {
            match self.frame() {
                Some((1, data)) => self.stdout.extend_from_slice(&data),
                Some((2, data)) => self.stderr.extend_from_slice(&data),
                other => panic!("waiting for {needle:?}, got {other:?}; stdout so far {:?}", self.out()),
            }
        }
    }

    /// Reads the rest: the end frame must be last.
    fn end(&mut self) -> Value {
        loop {
            match self.frame() {
                Some((1, data)) => self.stdout.extend_from_slice(&data),
                Some((2, data)) => self.stderr.extend_from_slice(&data),
                Some((3, data)) => {
                    let end: Value = serde_json::from_slice(&data).unwrap();
                    assert_eq!(self.frame(), None, "frames after the end");
                    return end;
                }
                other => panic!("unexpected {other:?}; stdout {:?}", self.out()),
            }
        }
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn create(d: &TestDaemon, name: &str) {
    let (status, created) = d.json("POST", "/v1/sandboxes", Some(json!({ "name": name })));
    assert_eq!(status, 201, "{created}\n{}", d.log());
}

#[test]
fn daemon_exec_takes_stdin_a_terminal_resizes_and_signals() {
    let d = TestDaemon::start("attach");
    create(&d, "att");
    let path = "att";

    // Stdin reaches the process; the end of the body closes it.
    let mut s =
        Session::open(&d, path, json!({ "argv": ["sh", "-c", "read x; echo got:$x; cat; echo done"] }));
    s.stdin("hello\n");
    s.stdin("more ");
    s.stdin("input\n");
    s.finish();
    let end = s.end();
    assert_eq!(end, json!({ "type": "exit", "code": 0, "signal": null, "timed_out": false }), "{}", s.out());
    assert_eq!(s.out(), "got:hello\nmore input\ndone\n");

    // Stderr comes as its own frames without a terminal; a close-stdin
    // frame ends stdin as well.
    let mut s = Session::open(&d, path, json!({ "argv": ["sh", "-c", "cat >&2; exit 3"] }));
    s.stdin("to stderr");
    s.send(6, b"");
    let end = s.end();
    assert_eq!(end["code"], 3, "{end}");
    assert_eq!(String::from_utf8_lossy(&s.stderr), "to stderr");

    // A terminal of the asked size, resized while the process runs.
    let mut s = Session::open(
        &d,
        path,
        json!({ "argv": ["sh", "-c", "stty size; read x; stty size; test -t 0 && echo tty:$x"], "tty": { "rows": 30, "cols": 100 } }),
    );
    s.wait_for("30 100");
    s.resize(50, 132);
    s.stdin("yes\n");
    let end = s.end();
    assert_eq!(end["code"], 0, "{end} {}", s.out());
    let out = s.out().replace("\r\n", "\n");
    assert!(out.contains("50 132\n"), "{out:?}");
    assert!(out.contains("tty:yes\n"), "{out:?}");
    assert!(s.stderr.is_empty());

    // A signal frame reaches the process (its whole process group).
    let mut s = Session::open(&d, path, json!({ "argv": ["sh", "-c", "echo ready; sleep 100"] }));
    s.wait_for("ready");
    s.signal(15);
    let end = s.end();
    assert_eq!(end["signal"], 15, "{end}");
    assert_eq!(end["code"], Value::Null, "{end}");

    // The NDJSON path takes a terminal too: `true` is 24x80.
    let (status, body) = d.request(
        "POST",
        &format!("/v1/sandboxes/{path}/exec"),
        Some(r#"{"argv":["stty","size"],"tty":true}"#),
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stdout: Vec<&str> =
        lines.iter().filter(|l| l["type"] == "stdout").map(|l| l["data"].as_str().unwrap()).collect();
    assert_eq!(stdout, ["MjQgODANCg=="], "{body}"); // "24 80\r\n"
    assert_eq!(lines.last().unwrap()["code"], 0, "{body}");

    // Bad requests are JSON errors before anything runs.
    let (status, body) = d.request("POST", "/v1/sandboxes/att/exec?stream=ws", Some(r#"{"argv":["true"]}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_query"), "{body}");
    let (status, body) = d.request("POST", "/v1/sandboxes/att/exec?stream=raw", Some(r#"{"argv":["true"]}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("one line of JSON"), "{body}");
    let (status, body) =
        d.request("POST", "/v1/sandboxes/nope/exec?stream=raw", Some("{\"argv\":[\"true\"]}\n"));
    assert_eq!(status, 404, "{body}");

    let (status, body) = d.request("DELETE", "/v1/sandboxes/att", None);
    assert!(status == 200 || status == 204, "{status} {body}");
}

#[test]
fn daemon_exec_upgrades_the_connection_to_frames() {
    let d = TestDaemon::start("upgrade");
    create(&d, "upg");
    // Stdin in, output and the exit status out, over the upgraded stream.
    let mut s = Session::upgrade(&d, "upg", json!({ "argv": ["sh", "-c", "read x; echo got:$x; exit 3"] }));
    s.stdin("hello\n");
    s.send(6, b"");
    let end = s.end();
    assert_eq!(end["code"], 3, "{end}");
    assert_eq!(s.out(), "got:hello\n");
    // A terminal, resized while the process runs.
    let mut s = Session::upgrade(
        &d,
        "upg",
        json!({ "argv": ["sh", "-c", "stty size; read x; stty size"], "tty": { "rows": 30, "cols": 100 } }),
    );
    s.wait_for("30 100");
    s.resize(50, 132);
    s.stdin("\n");
    s.wait_for("50 132");
    assert_eq!(s.end()["code"], 0);
    // A client that goes away takes its process with it.
    let mut s = Session::upgrade(&d, "upg", json!({ "argv": ["sh", "-c", "echo $$; exec sleep 300"] }));
    s.wait_for("\n");
    let pid = s.out().trim().to_owned();
    drop(s);
    let alive = |pid: &str| {
        let (status, body) = d.request(
            "POST",
            "/v1/sandboxes/upg/exec",
            Some(&json!({ "argv": ["kill", "-0", pid] }).to_string()),
        );
        assert_eq!(status, 200, "{body}");
        body.contains("\"code\":0")
    };
    assert!(wait_until(10, || !alive(&pid)), "process {pid} outlived its upgraded connection");
    // Only this protocol is offered.
    let (status, body) = d.request("GET", "/v1/health", None);
    assert_eq!(status, 200, "{body}");
    let mut conn = UnixStream::connect(&d.socket).unwrap();
    conn.write_all(
        b"POST /v1/sandboxes/upg/exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Content-Length: 15\r\n\r\n{\"argv\":[\"id\"]}",
    )
    .unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400");
}

/// The plain NDJSON form too: a client that goes away mid-exec (here the
/// process prints nothing more, so only the closed connection tells) gets
/// its process killed, and the event log says the exec was cancelled.
#[test]
fn daemon_ndjson_exec_is_cancelled_when_its_client_hangs_up() {
    let d = TestDaemon::start("hangup");
    create(&d, "hup");
    let request = json!({ "argv": ["sh", "-c", "echo $$; exec sleep 300"] }).to_string();
    let conn = UnixStream::connect(&d.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut writer = conn.try_clone().unwrap();
    write!(
        writer,
        "POST /v1/sandboxes/hup/exec HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{request}",
        request.len()
    )
    .unwrap();
    // Read the answer until the stdout line carrying the pid.
    let mut reader = BufReader::new(conn);
    let pid = loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the answer ended early");
        let Some(start) = line.find('{') else { continue };
        let Ok(event) = serde_json::from_str::<Value>(line[start..].trim()) else { continue };
        if event["type"] == "stdout" {
            let text = STANDARD.decode(event["data"].as_str().unwrap()).unwrap();
            break String::from_utf8(text).unwrap().trim().to_owned();
        }
    };
    drop(reader);
    drop(writer);
    let alive = || {
        let body = json!({ "argv": ["kill", "-0", &pid] }).to_string();
        let (status, answer) = d.request("POST", "/v1/sandboxes/hup/exec", Some(&body));
        assert_eq!(status, 200, "{answer}");
        answer.contains("\"code\":0")
    };
    assert!(wait_until(10, || !alive()), "process {pid} outlived its client");
    let events = d.request("GET", "/v1/events?sandbox=hup", None).1;
    assert!(events.contains("\"cancelled\":true") && events.contains("sleep 300"), "{events}");
}
