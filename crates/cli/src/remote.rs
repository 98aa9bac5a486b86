//! The commands that go through `airlock daemon` when one answers: each
//! becomes requests to its API (docs/api.md), and the answers are shown
//! the way the direct commands show theirs.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use airlock_policy::{Policy, WorkspaceMode};
use airlock_proto::exec_stream as frames;
use airlock_runtime::ops;
use airlock_runtime::view::DaemonFacts;
use airlock_runtime::view::SandboxView;
use serde_json::{Value, json};

use super::daemon_client::{self, Daemon, DaemonError};
use super::{
    CliResult, Command, Copy, CreateArgs, ExecArgs, apply_locally, ask_to_apply, direct, exit_status,
};

/// The commands the daemon serves; anything else runs directly.
pub(super) fn through_daemon(daemon: &Daemon, command: Command) -> CliResult {
    use hyper::Method;
    let sandbox_path =
        |name: &str, rest: &str| format!("/v1/sandboxes/{}{rest}", daemon_client::encode(name));
    match command {
        Command::Create(args) => remote_create(daemon, args),
        Command::Exec(args) => remote_exec(daemon, args),
        Command::Ls { json } => {
            let answer = daemon.json(Method::GET, "/v1/sandboxes", None)?;
            let sandboxes = answer["sandboxes"].as_array().cloned().unwrap_or_default();
            let views = sandboxes
                .iter()
                .map(|s| serde_json::from_value::<SandboxView>(s.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            crate::present::list(&sandboxes, &views, json)?;
            Ok(0)
        }
        Command::Inspect { name, json } => {
            let answer = daemon.json(Method::GET, &sandbox_path(&name, ""), None)?;
            let view: SandboxView = serde_json::from_value(answer.clone())?;
            let facts: DaemonFacts = serde_json::from_value(answer.clone())?;
            crate::present::inspect(&answer, &view, &facts, json)?;
            Ok(0)
        }
        Command::Stop { name } => {
            let answer = daemon.json(Method::POST, &sandbox_path(&name, "/stop"), None)?;
            println!("stopped {name} ({})", answer["state"].as_str().unwrap_or("stopped"));
            Ok(0)
        }
        Command::Rm { names } => {
            for name in names {
                daemon.json(Method::DELETE, &sandbox_path(&name, ""), None)?;
                println!("removed {name}");
            }
            Ok(0)
        }
        Command::Diff { name, stat, json } => {
            if json {
                let answer = daemon.json(Method::GET, &sandbox_path(&name, "/diff"), None)?;
                let mut out = io::stdout().lock();
                serde_json::to_writer_pretty(&mut out, &answer)?;
                writeln!(out)?;
            } else {
                let format = if stat { "stat" } else { "patch" };
                let path = sandbox_path(&name, &format!("/diff?format={format}"));
                let mut out = Tail::new(io::stdout().lock());
                daemon.download(&path, &mut out)?;
                out.flush()?;
                out.digest()?;
            }
            Ok(0)
        }
        Command::Apply { name, yes, allow_protected, expect } => {
            remote_apply(daemon, &name, yes, allow_protected, expect)
        }
        Command::Events { follow, sandbox, since, json } => {
            remote_events(daemon, follow, sandbox, since, json)
        }
        Command::Cp { source, destination } => remote_cp(daemon, Copy::plan(&source, &destination)?),
        Command::Files(command) => super::files_cmd::through_daemon(daemon, command),
        Command::Logs { name, stderr, raw } => {
            let stream = if stderr { "stderr" } else { "stdout" };
            let mut out = crate::present::SandboxOutput::stdout(raw);
            daemon.download(&sandbox_path(&name, &format!("/logs?stream={stream}")), &mut out)?;
            Ok(0)
        }
        Command::Report { name: Some(name), output, .. } => {
            super::write_report(&output, |out| {
                daemon.download(&sandbox_path(&name, "/report"), out)?;
                Ok(())
            })?;
            Ok(0)
        }
        Command::Export { name, output } => {
            let output = output.unwrap_or_else(|| PathBuf::from(format!("{name}.tar.zst")));
            remote_export(daemon, &sandbox_path(&name, "/export"), &output)
        }
        other => direct(other, false),
    }
}

/// `airlock export` through the daemon: the bundle it made, checked here
/// as any bundle is read (signature, every member, the audit chain) before
/// it replaces `output`.
fn remote_export(daemon: &Daemon, path: &str, output: &Path) -> CliResult {
    use airlock_runtime::bundle;
    let mut staged =
        super::Staged::create(output, 0o600).map_err(|e| format!("{}: {e}", output.display()))?;
    daemon.download(path, &mut staged)?;
    let opened = bundle::open(staged.staged_path(), None)
        .map_err(|e| format!("the daemon's bundle for {} does not check out: {e}", output.display()))?;
    staged.commit().map_err(|e| format!("{}: {e}", output.display()))?;
    crate::present::exported(&bundle::ExportReport {
        path: output.to_path_buf(),
        members: opened.manifest.members.len(),
        bytes: opened.manifest.members.iter().map(|m| m.size).sum(),
        host_key: opened.signer,
        notes: opened.manifest.notes,
    });
    Ok(0)
}

/// Passes a diff's text through and keeps its end: the text the daemon
/// renders ends with `change sha256:…` only when all of it was rendered
/// and matched that digest.
struct Tail<W: Write> {
    inner: W,
    end: Vec<u8>,
}

/// Enough for the digest line (78 bytes) and its newline.
const TAIL_LEN: usize = 256;

impl<W: Write> Tail<W> {
    fn new(inner: W) -> Tail<W> {
        Tail { inner, end: Vec::new() }
    }

    /// The digest on the last line, or why there is none.
    fn digest(&self) -> Result<ops::ChangeDigest, Box<dyn std::error::Error>> {
        let text = String::from_utf8_lossy(&self.end);
        text.strip_suffix('\n')
            .and_then(|t| t.rsplit('\n').next())
            .and_then(|line| line.strip_prefix("change "))
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| {
                "the daemon's diff ended without its digest line (`change sha256:…`): it was cut short \
                 or the sandbox changed a file while it was shown (see above); run `airlock diff` again"
                    .into()
            })
    }
}

impl<W: Write> Write for Tail<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.end.extend_from_slice(buf.get(..n).unwrap_or_default());
        if self.end.len() > TAIL_LEN {
            self.end.drain(..self.end.len() - TAIL_LEN);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `airlock apply` through the daemon: the summary and the workspace come
/// from the API, the daemon writes. A root daemon writes only for root, so
/// a user applies the same changes as themself. Either way, what is written
/// is held to the digest shown (or to `expect`).
fn remote_apply(
    daemon: &Daemon,
    name: &str,
    yes: bool,
    allow_protected: bool,
    expect: Option<ops::ChangeDigest>,
) -> CliResult {
    use hyper::Method;
    let sandbox = |rest: &str| format!("/v1/sandboxes/{}{rest}", daemon_client::encode(name));
    let diff = daemon.json(Method::GET, &sandbox("/diff"), None)?;
    let empty_digest = diff["digest"].as_str().and_then(|d| d.parse::<ops::ChangeDigest>().ok());
    if diff["changes"].as_array().is_none_or(Vec::is_empty) && (expect.is_none() || expect == empty_digest) {
        println!("sandbox {name} changed nothing; nothing to apply");
        return Ok(0);
    }
    let mut stat = Tail::new(io::stdout().lock());
    daemon.download(&sandbox("/diff?format=stat"), &mut stat)?;
    stat.flush()?;
    let shown = stat.digest()?;
    drop(stat);
    if let Some(expected) = expect
        && expected != shown
    {
        return Err(ops::ApplyError::DigestMismatch { expected, found: shown }.into());
    }
    if !yes {
        let info = daemon.json(Method::GET, &sandbox(""), None)?;
        let workspace = info["workspace"].as_str().unwrap_or("its workspace");
        if !ask_to_apply(name, workspace, &shown.to_string())? {
            return Ok(1);
        }
    }
    let body = json!({ "allow_protected": allow_protected, "expect": shown.to_string() });
    match daemon.json(Method::POST, &sandbox("/apply"), Some(&body)) {
        Ok(answer) => {
            let count = |key: &str| answer[key].as_array().map_or(0, Vec::len);
            let digest = answer["digest"].as_str().map(|d| format!(" (change {d})")).unwrap_or_default();
            println!("applied: {} written, {} deleted{digest}", count("written"), count("deleted"));
            Ok(0)
        }
        Err(e) if e.code() == Some("forbidden") => apply_locally(ops::prepare_apply(
            &super::state()?,
            name,
            allow_protected,
            Some(shown),
            &mut |_| {},
        )?),
        Err(e) => Err(e.into()),
    }
}

/// The policy as the daemon takes it: a built-in name, or a policy file by
/// its absolute path.
fn policy_for_daemon(policy: &str) -> Result<String, Box<dyn std::error::Error>> {
    if Policy::builtin_names().contains(&policy) || !std::path::Path::new(policy).exists() {
        return Ok(policy.to_owned());
    }
    let path = std::fs::canonicalize(policy).map_err(|e| format!("policy file {policy}: {e}"))?;
    Ok(path.to_string_lossy().into_owned())
}

fn remote_create(daemon: &Daemon, args: CreateArgs) -> CliResult {
    let s = &args.sandbox;
    let mut body = serde_json::Map::new();
    if let Some(name) = &s.name {
        body.insert("name".into(), json!(name));
    }
    body.insert("policy".into(), json!(policy_for_daemon(&s.policy)?));
    // As without a daemon, the workspace defaults to the current directory;
    // `--mode none` mounts nothing.
    if s.mode != Some(WorkspaceMode::None) {
        let workspace = match &s.workspace {
            Some(path) => path.clone(),
            None => std::env::current_dir()?,
        };
        let absolute = std::fs::canonicalize(&workspace)
            .map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
        body.insert("workspace".into(), json!(absolute));
    }
    if let Some(mode) = s.mode {
        body.insert("workspace_mode".into(), json!(mode.to_string()));
    }
    if !s.env.is_empty() {
        body.insert("env".into(), Value::Object(s.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect()));
    }
    if !args.labels.is_empty() {
        body.insert(
            "labels".into(),
            Value::Object(args.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        );
    }
    if let Some(timeout) = s.timeout {
        body.insert("timeout".into(), json!(timeout.as_secs().max(1)));
    }
    if let Some(idle) = args.idle_timeout {
        body.insert("idle_timeout".into(), json!(idle.as_secs().max(1)));
    }
    if let Some(memory) = s.memory {
        body.insert("memory".into(), json!(memory));
    }
    if let Some(pids) = s.pids {
        body.insert("pids".into(), json!(pids));
    }
    if let Some(cpus) = s.cpus {
        body.insert("cpus".into(), json!(cpus));
    }
    if !s.allow.is_empty() {
        body.insert("allow".into(), json!(s.allow));
    }
    if let Some(tier) = s.tier {
        body.insert("tier".into(), json!(tier.as_str()));
    }
    if let Some(image) = &s.image {
        body.insert("image".into(), json!(airlock_runtime::image::canonical_name(image)));
    }
    if let Some(user) = &s.user {
        body.insert("user".into(), json!(user));
    }
    if !args.ports.is_empty() {
        body.insert("ports".into(), json!(args.ports.iter().map(ToString::to_string).collect::<Vec<_>>()));
    }
    let created = daemon.json(hyper::Method::POST, "/v1/sandboxes", Some(&Value::Object(body)))?;
    println!("{}", created["name"].as_str().unwrap_or_default());
    Ok(0)
}

/// `airlock exec` through the API, in its interactive form whatever the
/// flags: stdin (with `-i`) and the terminal's size changes (with `-t`) go
/// up as frames, output comes down as frames. SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT sent to `airlock` are passed on to the process; a terminal in
/// raw mode sends its keys (Ctrl-C among them) as input instead.
fn remote_exec(daemon: &Daemon, args: ExecArgs) -> CliResult {
    use std::io::IsTerminal;
    let mut body = json!({ "argv": args.command });
    if !args.env.is_empty() {
        body["env"] = Value::Object(args.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
    }
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(timeout) = args.timeout {
        body["timeout"] = json!(timeout.as_secs().max(1));
    }
    if let Some(user) = &args.user {
        body["user"] = json!(user);
    }
    let terminal = args.tty.then(crate::terminal::size).map(|s| s.unwrap_or((24, 80)));
    if let Some((rows, cols)) = terminal {
        body["tty"] = json!({ "rows": rows, "cols": cols });
    }
    let path = format!("/v1/sandboxes/{}/exec?stream=raw", daemon_client::encode(&args.name));
    let (input, frames_in) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    if args.interactive {
        let input = input.clone();
        std::thread::spawn(move || {
            let mut stdin = io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let frame = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => frames::encode(frames::CLOSE_STDIN, &[]),
                    Ok(n) => frames::encode(frames::STDIN, &buf[..n]),
                };
                let last = frame[0] == frames::CLOSE_STDIN;
                if input.blocking_send(frame).is_err() || last {
                    return;
                }
            }
        });
    } else {
        let _ = input.try_send(frames::encode(frames::CLOSE_STDIN, &[]));
    }
    let resizes = input.clone();
    let _resizer = terminal
        .map(|_| {
            crate::terminal::forward_resizes(move |rows, cols| {
                resizes.blocking_send(frames::resize(rows, cols)).is_ok()
            })
        })
        .transpose()?;
    let _signals =
        crate::terminal::forward_signals(move |signal| input.blocking_send(frames::signal(signal)).is_ok())?;
    // Raw mode only for a real interactive session; restored on drop.
    let _raw =
        (args.tty && args.interactive && io::stdin().is_terminal()).then(crate::terminal::RawMode::enter);
    let mut out = io::stdout();
    let mut err = io::stderr();
    let end = daemon.exec_stream(&path, &body, frames_in, |kind, payload| {
        match kind {
            frames::STDOUT => {
                out.write_all(payload)?;
                out.flush()?;
            }
            frames::STDERR => err.write_all(payload)?,
            _ => {}
        }
        Ok(())
    })?;
    drop(_raw);
    exec_end(&args.name, &serde_json::from_slice(&end)?)
}

/// The exit code from the exec's `exit` object; its `error` as an error.
fn exec_end(name: &str, end: &Value) -> CliResult {
    if end["type"] == "error" {
        let message = end["message"].as_str().unwrap_or("the exec broke off");
        return Err(DaemonError::Protocol(format!("exec in {name}: {message}")).into());
    }
    let number = |key: &str| end[key].as_i64().and_then(|n| i32::try_from(n).ok());
    Ok(exit_status(number("code"), number("signal"), end["timed_out"] == true))
}

/// `airlock cp` through the files API, streamed both ways: into the sandbox
/// the file replaces the target only once it has all arrived; out of it,
/// the host file is replaced only once the whole file arrived (the daemon
/// refuses what is not a regular file within the sandbox's disk budget).
fn remote_cp(daemon: &Daemon, copy: Copy<'_>) -> CliResult {
    let files = |name: &str, path: &str| {
        format!("/v1/sandboxes/{}/files?path={}", daemon_client::encode(name), daemon_client::encode(path))
    };
    match copy {
        Copy::In { file, name, path } => {
            use std::os::unix::fs::PermissionsExt;
            let input = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            // A new file gets the source's permission bits, as directly.
            let mode = input.metadata().map_err(|e| format!("{}: {e}", file.display()))?.permissions().mode();
            daemon.put_file(&format!("{}&mode={:o}", files(name, &path), mode & 0o777), input)?;
        }
        Copy::Out { name, path, file } => {
            let mut staged =
                super::Staged::create(&file, 0o666).map_err(|e| format!("{}: {e}", file.display()))?;
            daemon.download(&files(name, path), &mut staged)?;
            staged.commit().map_err(|e| format!("{}: {e}", file.display()))?;
        }
    }
    Ok(0)
}

fn remote_events(
    daemon: &Daemon,
    follow: bool,
    sandbox: Option<String>,
    since: Option<u64>,
    json: bool,
) -> CliResult {
    let mut query = Vec::new();
    if follow {
        query.push("follow=true".to_owned());
    }
    if let Some(name) = &sandbox {
        query.push(format!("sandbox={}", daemon_client::encode(name)));
    }
    if let Some(id) = since {
        query.push(format!("since={id}"));
    }
    let path =
        if query.is_empty() { "/v1/events".to_owned() } else { format!("/v1/events?{}", query.join("&")) };
    let mut parser = daemon_client::SseParser::default();
    let result = daemon.lines(hyper::Method::GET, &path, None, &mut |line| {
        let Some(event) = parser.line(line) else { return Ok(()) };
        let mut out = io::stdout().lock();
        if json {
            writeln!(out, "{}", event.data)?;
        } else {
            let value: serde_json::Value = serde_json::from_str(&event.data)?;
            daemon_client::print_event(&value, &mut out)?;
        }
        out.flush()?;
        Ok(())
    });
    match result {
        Ok(()) => Ok(0),
        // A reader that stops early (`airlock events -f | head`) is not an error.
        Err(DaemonError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tail_of(chunks: &[&[u8]]) -> Tail<Vec<u8>> {
        let mut tail = Tail::new(Vec::new());
        for chunk in chunks {
            tail.write_all(chunk).unwrap();
        }
        tail
    }

    #[test]
    fn the_digest_is_read_from_the_last_line_however_the_text_arrives() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let text = format!("{}\n 1 file changed\nchange {digest}\n", "+line\n".repeat(500));
        let bytes = text.as_bytes();
        for split in [1, 7, 80, bytes.len() - 3, bytes.len()] {
            let (a, b) = bytes.split_at(split);
            let tail = tail_of(&[a, b]);
            assert_eq!(tail.digest().unwrap().to_string(), digest);
            assert_eq!(tail.inner, bytes, "passed through unchanged");
        }
    }

    #[test]
    fn a_text_without_its_digest_line_is_an_error() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for text in [
            String::new(),
            "+a\n".to_string(),
            // The daemon's note when the sandbox rewrote a file mid-render.
            format!("change {digest}\n+a\n\nairlock: a.txt changed in the sandbox\n"),
            format!("change {digest}"),
            format!("change {}\n", &digest[..20]),
        ] {
            let err = tail_of(&[text.as_bytes()]).digest().unwrap_err();
            assert!(err.to_string().contains("without its digest line"), "{text:?}: {err}");
        }
    }
}
